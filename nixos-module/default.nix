# services.substituter: the pluggable, verifying external substituter for Nix.
#
# Runs `substituter daemon` as a hardened systemd service with a generated JSON config and
# points this machine's Nix at it.  Secrets (dataspace capabilities, the syndicate-server
# key) are paths loaded with LoadCredential, never values copied into the world-readable
# Nix store.  See ./README.md.
{ config, lib, pkgs, ... }:

let
  inherit (lib)
    concatMapStringsSep
    hasPrefix
    literalExpression
    mkDefault
    mkEnableOption
    mkIf
    mkMerge
    mkOption
    optional
    optionalAttrs
    types
    ;

  cfg = config.services.substituter;
  syndicateCfg = cfg.syndicateServer;
  settingsFormat = pkgs.formats.json { };

  # Fixed by systemd from the unit names and the *Directory= settings below; the rendered
  # config has to name them literally because the daemon does not expand variables.
  stateDir = "/var/lib/substituter";
  cacheDir = "/var/cache/substituter";
  runtimeDir = "/run/substituter";
  credentialsDir = "/run/credentials/substituter.service";
  syndicateRuntimeDir = "/run/substituter-syndicate";
  syndicateSocket = "${syndicateRuntimeDir}/ds.sock";
  # Members of this group may open the local syndicate-server socket (the server itself
  # makes its socket world-accessible, so the directory around it is what guards it).
  syndicateGroup = "substituter-syndicate";
  syndicateOid = "substituter";

  # A secret given as a path: an absolute path string, so a Nix path literal (which would be
  # copied into the store when interpolated) is refused by the type check.
  secretPath = types.strMatching "/.+";

  # "HOST:PORT" or "[IPV6]:PORT"; null for anything else (e.g. "unix:/path").
  parseHostPort = address:
    let m = builtins.match "\\[([0-9a-fA-F:]+)]:([0-9]+)|([^]:[]+):([0-9]+)" address;
    in if m == null then null else {
      host = if builtins.elemAt m 0 != null then builtins.elemAt m 0 else builtins.elemAt m 2;
      port = lib.toInt (if builtins.elemAt m 1 != null then builtins.elemAt m 1 else builtins.elemAt m 3);
    };

  listen = parseHostPort cfg.listen;
  isLoopback = host: builtins.elem host [ "127.0.0.1" "::1" "localhost" ];

  # Nix reaches a wildcard bind through loopback.
  urlHost = host:
    if host == "0.0.0.0" then "127.0.0.1"
    else if host == "::" then "[::1]"
    else if lib.hasInfix ":" host then "[${host}]"
    else host;
  substituterUrl = "http://${urlHost listen.host}:${toString listen.port}";

  dataspaceSettings =
    if syndicateCfg.enable then {
      connect = ''<unix "${syndicateSocket}">'';
      cap-file = "${runtimeDir}/syndicate.cap";
    } else if cfg.dataspace.connect != null then {
      connect = cfg.dataspace.connect;
      cap-file = "${credentialsDir}/dataspace-cap";
    } else {
      # Embedded dataspace, exposed to out-of-process fetchers and `substituter status`.
      socket = "${runtimeDir}/dataspace.sock";
    };

  # Typed options first; `settings` is applied on top so any daemon key can be set or
  # overridden there.
  derivedSettings = {
    listen = cfg.listen;
    trusted-public-keys = cfg.trustedPublicKeys;
    priority = cfg.priority;
    state-dir = stateDir;
    fetchers = cfg.fetchers;
    nar-cache = {
      enable = cfg.narCache.enable;
      max-size = cfg.narCache.maxSize;
      path = "${cacheDir}/nar-cache";
    };
    dataspace = dataspaceSettings;
  };
  finalSettings = lib.recursiveUpdate derivedSettings cfg.settings;
  configFile = pkgs.writeText "substituter.json" (builtins.toJSON finalSettings);

  pluginPath = pkgs.python3Packages.makePythonPath cfg.extraFetcherPackages;

  # The sturdy ref for the local syndicate-server: HMAC-BLAKE2s-256(key, canonical(oid)),
  # first 16 bytes.  Computed at start from the credential, so the key never reaches the
  # store or a command line.  b"\xb1\x0bsubstituter" is the canonical Preserves encoding
  # of the string "substituter" (tag 0xb1, length 11).
  mintCapability = pkgs.writeText "substituter-mint-cap.py" ''
    import hashlib, hmac, os, sys
    from pathlib import Path

    key_file = Path(os.environ["CREDENTIALS_DIRECTORY"]) / "syndicate-key"
    text = key_file.read_text().strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        sys.exit(f"{key_file}: the syndicate-server key must be hex text")
    oid = "${syndicateOid}".encode()
    sig = hmac.new(key, b"\xb1" + bytes([len(oid)]) + oid, hashlib.blake2s).digest()[:16]
    out = Path(os.environ["RUNTIME_DIRECTORY"].split(":")[0]) / "syndicate.cap"
    os.umask(0o077)
    out.write_text('<ref {oid: "${syndicateOid}" sig: #x"' + sig.hex() + '"}>\n')
  '';

  # syndicate-server's config, with placeholders filled in at start from the credential.
  syndicateConfigTemplate = pkgs.writeText "substituter-syndicate.pr" (''
    let ?ds = dataspace
    <require-service <relay-listener <unix "@RUNTIME_DIRECTORY@/ds.sock"> $gatekeeper>>
  '' + lib.optionalString (syndicateCfg.tcp != null) ''
    <require-service <relay-listener <tcp "${syndicateTcp.host}" ${toString syndicateTcp.port}> $gatekeeper>>
  '' + ''
    <bind <ref {oid: "${syndicateOid}" key: #x"@KEY@"}> $ds #f>
  '' + syndicateCfg.extraConfig);
  syndicateTcp = if syndicateCfg.tcp == null then null else parseHostPort syndicateCfg.tcp;

  writeSyndicateConfig = pkgs.writeShellScript "substituter-syndicate-config" ''
    set -eu
    key=$(${pkgs.coreutils}/bin/tr -d '[:space:]' < "$CREDENTIALS_DIRECTORY/key")
    case "$key" in
      "" | *[!0-9a-fA-F]*)
        echo "syndicate-server key file: expected hex text" >&2
        exit 1 ;;
    esac
    runtime=''${RUNTIME_DIRECTORY%%:*}
    umask 077
    ${pkgs.coreutils}/bin/mkdir -p "$runtime/config"
    # Both values are checked above or set by systemd: safe inside the sed replacement.
    ${pkgs.gnused}/bin/sed -e "s|@KEY@|$key|" -e "s|@RUNTIME_DIRECTORY@|$runtime|" \
      ${syndicateConfigTemplate} > "$runtime/config/substituter.pr"
  '';

  # Shared by both services: what a network daemon that only reads and writes its own
  # directories needs, and nothing more.
  hardening = {
    DynamicUser = true;
    ProtectSystem = "strict";
    ProtectHome = true;
    PrivateTmp = true;
    PrivateDevices = true;
    NoNewPrivileges = true;
    ProtectProc = "invisible";
    ProcSubset = "pid";
    ProtectClock = true;
    ProtectControlGroups = true;
    ProtectHostname = true;
    ProtectKernelLogs = true;
    ProtectKernelModules = true;
    ProtectKernelTunables = true;
    RestrictAddressFamilies = [ "AF_UNIX" "AF_INET" "AF_INET6" ];
    SystemCallFilter = [ "@system-service" "~@privileged" "~@resources" ];
    SystemCallArchitectures = "native";
    CapabilityBoundingSet = "";
    AmbientCapabilities = "";
    MemoryDenyWriteExecute = true;
    RestrictNamespaces = true;
    RestrictRealtime = true;
    RestrictSUIDSGID = true;
    LockPersonality = true;
    UMask = "0077";
    Restart = "on-failure";
    RestartSec = "2s";
  };
in
{
  options.services.substituter = {
    enable = mkEnableOption "the substituter daemon, a pluggable verifying substituter for Nix";

    package = mkOption {
      type = types.package;
      default = pkgs.substituter or (pkgs.callPackage ./package.nix { });
      defaultText = literalExpression "pkgs.substituter or (pkgs.callPackage ./package.nix { })";
      description = "The substituter package (its `substituter` command runs the daemon).";
    };

    listen = mkOption {
      type = types.str;
      default = "127.0.0.1:37515";
      example = "[::1]:37515";
      description = ''
        Where the daemon serves the binary-cache HTTP endpoint Nix talks to: `HOST:PORT` or
        `[IPV6]:PORT`.  Keep it on loopback unless other machines should substitute through it.
      '';
    };

    priority = mkOption {
      type = types.ints.unsigned;
      default = 10;
      description = ''
        Priority of the daemon among Nix's substituters (lower is tried first;
        cache.nixos.org has 40), added to the URL as `?priority=` and advertised by the daemon.
      '';
    };

    trustedPublicKeys = mkOption {
      type = types.listOf types.str;
      default = [ "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=" ];
      description = ''
        Keys whose signatures make an offer trustworthy.  The daemon passes upstream
        signatures through, so Nix is told to trust the same keys.
      '';
    };

    fetchers = mkOption {
      type = types.listOf (types.attrsOf settingsFormat.type);
      default = [ { type = "binary-cache"; url = "https://cache.nixos.org"; priority = 40; } ];
      example = literalExpression ''
        [
          { type = "local-mirror"; path = "/srv/nix-cache"; }
          { type = "binary-cache"; url = "https://cache.nixos.org"; priority = 40; }
        ]
      '';
      description = ''
        Fetcher plugins, one attribute set each: `type` (the plugin's entry-point name) and
        optionally `name`, `priority`, `locate-timeout`; every other key is the plugin's own
        option (see `substituter plugins`).
      '';
    };

    narCache = {
      enable = mkOption {
        type = types.bool;
        default = true;
        description = "Keep recently served NARs on disk (in the service's CacheDirectory).";
      };
      maxSize = mkOption {
        type = types.either types.ints.unsigned types.str;
        default = "10G";
        example = "512M";
        description = "Size limit of the NAR cache: bytes, or a size such as `10G` or `512M`.";
      };
    };

    dataspace = {
      connect = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = ''<tcp "127.0.0.1" 8001>'';
        description = ''
          Address of an external syndicate-server (`<unix "/path">` or `<tcp "host" port>`).
          Null: an embedded dataspace, served on a unix socket in /run/substituter for
          out-of-process fetchers.
        '';
      };
      capabilityFile = mkOption {
        type = types.nullOr secretPath;
        default = null;
        example = "/run/keys/substituter.cap";
        description = ''
          A file holding the sturdy ref (`<ref {oid: … sig: #x"…"}>`) to present to
          {option}`services.substituter.dataspace.connect`.  Loaded with LoadCredential; give a
          path as a string so it is never copied into the Nix store.
        '';
      };
    };

    extraFetcherPackages = mkOption {
      type = types.listOf types.package;
      default = [ ];
      example = literalExpression "[ pkgs.python3Packages.substituter-fetcher-example ]";
      description = ''
        Python packages providing fetcher plugins (entry-point group `substituter.fetchers`),
        added to the daemon's Python path.  Build them with the same Python as the package.
      '';
    };

    settings = mkOption {
      type = settingsFormat.type;
      default = { };
      example = literalExpression ''{ locate-timeout = 3; log-level = "debug"; }'';
      description = ''
        Daemon configuration (see the daemon's config reference), merged over what the typed
        options produce and rendered to JSON.  Lists such as `fetchers` are replaced, not
        appended.  Never put secrets here: the file is in the Nix store.
      '';
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Open the listen port in the firewall (for serving other machines).";
    };

    memoryMax = mkOption {
      type = types.str;
      default = "1G";
      description = "systemd MemoryMax= for the daemon.";
    };

    syndicateServer = {
      enable = mkEnableOption ''
        a local syndicate-server as the daemon's dataspace (instead of the embedded one),
        so other processes and machines can join with a capability
      '';
      package = mkOption {
        type = types.package;
        default = pkgs.syndicate-server;
        defaultText = literalExpression "pkgs.syndicate-server";
        description = "The syndicate-server package.";
      };
      keyFile = mkOption {
        type = types.nullOr secretPath;
        default = null;
        example = "/run/keys/substituter-syndicate.key";
        description = ''
          File with the gatekeeper's secret key as hex text (e.g. `openssl rand -hex 16`).
          Capabilities for oid "substituter" are signed with it; the daemon mints its own.
          Loaded with LoadCredential, never copied into the store.
        '';
      };
      tcp = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "127.0.0.1:8001";
        description = ''
          An additional TCP relay listener (`HOST:PORT`) for fetchers on other machines.
          Without it the server listens only on ${syndicateSocket}.
        '';
      };
      openFirewall = mkOption {
        type = types.bool;
        default = false;
        description = "Open the TCP relay port in the firewall.";
      };
      extraConfig = mkOption {
        type = types.lines;
        default = "";
        description = "More syndicate-server configuration, appended to the generated file.";
      };
    };
  };

  config = mkIf cfg.enable (mkMerge [
    {
      assertions = [
        {
          assertion = listen != null;
          message = ''
            services.substituter.listen = "${cfg.listen}": Nix reaches substituters over HTTP,
            so give HOST:PORT or [IPV6]:PORT.
          '';
        }
        {
          assertion = cfg.dataspace.connect != null -> cfg.dataspace.capabilityFile != null;
          message = ''
            services.substituter.dataspace.connect is set but dataspace.capabilityFile is not:
            the syndicate-server admits only holders of a capability.
          '';
        }
        {
          assertion = cfg.dataspace.capabilityFile != null -> cfg.dataspace.connect != null;
          message = ''
            services.substituter.dataspace.capabilityFile is only used together with
            dataspace.connect (the embedded dataspace mints its own).
          '';
        }
        {
          assertion = !(syndicateCfg.enable && cfg.dataspace.connect != null);
          message = ''
            services.substituter.syndicateServer.enable points the daemon at the local
            syndicate-server; unset dataspace.connect (or disable syndicateServer).
          '';
        }
        {
          assertion = syndicateCfg.enable -> syndicateCfg.keyFile != null;
          message = "services.substituter.syndicateServer.enable needs syndicateServer.keyFile.";
        }
        {
          assertion = syndicateCfg.tcp == null || syndicateTcp != null;
          message = ''services.substituter.syndicateServer.tcp: expected HOST:PORT, got "${toString syndicateCfg.tcp}".'';
        }
        {
          assertion = builtins.all (path: path == null || !(hasPrefix builtins.storeDir path))
            [ cfg.dataspace.capabilityFile syndicateCfg.keyFile ];
          message = ''
            services.substituter: capabilityFile and keyFile must not be in the Nix store,
            which every local user can read.
          '';
        }
        {
          assertion = !(cfg.settings ? dataspace && cfg.settings.dataspace ? cap);
          message = ''
            services.substituter.settings.dataspace.cap would put a capability into the Nix
            store; use services.substituter.dataspace.capabilityFile.
          '';
        }
        {
          assertion = builtins.all (f: f ? type && builtins.isString f.type) cfg.fetchers;
          message = ''
            services.substituter.fetchers: every fetcher needs a `type` string, e.g.
            { type = "binary-cache"; url = "https://cache.nixos.org"; }.
          '';
        }
      ];

      warnings =
        optional (listen != null && !isLoopback listen.host) ''
          services.substituter.listen = "${cfg.listen}" is not loopback: any machine that can
          reach it may substitute through this daemon${lib.optionalString (!cfg.openFirewall)
            " (the firewall still blocks it; set openFirewall to serve the network)"}.
        ''
        ++ optional (cfg.openFirewall && listen != null && isLoopback listen.host) ''
          services.substituter.openFirewall opens port ${toString listen.port}, but the daemon
          listens on loopback only.
        '';

      nix.settings = {
        substituters = mkIf (listen != null) [ "${substituterUrl}?priority=${toString cfg.priority}" ];
        trusted-public-keys = cfg.trustedPublicKeys;
        # Nix remembers "not found" for an hour by default.  The daemon keeps its own negative
        # answers short because a path may appear later on another source (a peer, a mirror,
        # a fetcher that attaches late), so Nix should ask again soon.
        narinfo-cache-negative-ttl = mkDefault 60;
      };

      networking.firewall.allowedTCPPorts =
        optional (cfg.openFirewall && listen != null) listen.port
        ++ optional (syndicateCfg.enable && syndicateCfg.openFirewall && syndicateTcp != null)
          syndicateTcp.port;

      environment.systemPackages = [ cfg.package ];

      systemd.services.substituter = {
        description = "substituter: pluggable, verifying substituter for Nix";
        wantedBy = [ "multi-user.target" ];
        wants = [ "network-online.target" ];
        after = [ "network-online.target" ]
          ++ optional syndicateCfg.enable "substituter-syndicate.service";
        requires = optional syndicateCfg.enable "substituter-syndicate.service";
        environment = optionalAttrs (cfg.extraFetcherPackages != [ ]) {
          PYTHONPATH = pluginPath;
        };
        serviceConfig = hardening // {
          Type = "notify";
          NotifyAccess = "main";
          ExecStart = "${cfg.package}/bin/substituter daemon --config ${configFile}";
          StateDirectory = "substituter";
          StateDirectoryMode = "0700";
          CacheDirectory = "substituter";
          CacheDirectoryMode = "0700";
          # Holds the embedded dataspace's socket and capability (or the minted one).
          RuntimeDirectory = "substituter";
          RuntimeDirectoryMode = "0700";
          MemoryMax = cfg.memoryMax;
          LoadCredential =
            optional (cfg.dataspace.capabilityFile != null)
              "dataspace-cap:${cfg.dataspace.capabilityFile}"
            ++ optional syndicateCfg.enable "syndicate-key:${syndicateCfg.keyFile}";
        } // optionalAttrs syndicateCfg.enable {
          ExecStartPre = "${pkgs.python3}/bin/python3 ${mintCapability}";
          SupplementaryGroups = [ syndicateGroup ];
        };
      };
    }

    (mkIf syndicateCfg.enable {
      users.groups.${syndicateGroup} = { };

      systemd.services.substituter-syndicate = {
        description = "syndicate-server: the dataspace of the substituter daemon";
        wantedBy = [ "multi-user.target" ];
        before = [ "substituter.service" ];
        after = [ "network.target" ];
        serviceConfig = hardening // {
          Type = "simple";
          ExecStartPre = "${writeSyndicateConfig}";
          ExecStart = "${syndicateCfg.package}/bin/syndicate-server --no-banner -c ${syndicateRuntimeDir}/config";
          Group = syndicateGroup;
          RuntimeDirectory = "substituter-syndicate";
          # The group may reach the socket; the config (holding the key) stays 0700.
          RuntimeDirectoryMode = "0750";
          LoadCredential = [ "key:${syndicateCfg.keyFile}" ];
          MemoryMax = "512M";
        };
      };
    })
  ]);
}

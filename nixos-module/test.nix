# NixOS VM test: one machine serves a signed binary cache (a `nix copy --to file://` directory
# behind `python3 -m http.server`), the other substitutes from it through services.substituter.
#
#   nix-build nixos-module/test.nix                     # with <nixpkgs> on NIX_PATH
#   nix-build nixos-module/test.nix --arg pkgs 'import /path/to/nixpkgs { }'
#   nix-build nixos-module/test.nix -A driverInteractive   # to poke at the VMs
{ pkgs ? import <nixpkgs> { } }:

let
  # A throwaway key pair for this test only: the secret half signs the cache's narinfos.
  testSecretKey = "substituter-test-1:z0RPU3L7QnsGfgEnPvTcKj/CVyuss8OUwDZwosnPPgLWC50fBXcwXcYpkfOkgadVeYR8+mAPx6liUQUniIWDsw==";
  testPublicKey = "substituter-test-1:1gudHwV3MF3GKZHzpIGnVXmEfPpgD8epYlEFJ4iFg7M=";
  cacheDir = "/srv/cache";
  cachePort = 8080;
  daemonUrl = "http://127.0.0.1:37515";
  # What the client fetches: in the cache machine's store, absent from the client's.
  payload = pkgs.hello;
in
pkgs.testers.runNixOSTest {
  name = "substituter";

  nodes = {
    cache = { pkgs, ... }: {
      system.extraDependencies = [ payload ];
      nix.settings.experimental-features = [ "nix-command" ];
      environment.etc."nix/test-cache.sk".text = testSecretKey;
      systemd.tmpfiles.rules = [ "d ${cacheDir} 0755 root root -" ];
      # Started by the test script once the cache directory is filled.
      systemd.services.binary-cache = {
        serviceConfig.ExecStart =
          "${pkgs.python3}/bin/python3 -m http.server ${toString cachePort} --directory ${cacheDir}";
      };
      networking.firewall.allowedTCPPorts = [ cachePort ];
    };

    client = { lib, ... }: {
      imports = [ ./default.nix ];
      services.substituter = {
        enable = true;
        trustedPublicKeys = [ testPublicKey ];
        fetchers = [
          { type = "binary-cache"; name = "cache"; url = "http://cache:${toString cachePort}"; }
        ];
        narCache.maxSize = "256M";
        settings.log-level = "debug";
      };
      # The VMs have no internet: the daemon is the only substituter Nix may use.
      nix.settings.substituters = lib.mkForce [ "${daemonUrl}?priority=10" ];
      nix.settings.experimental-features = [ "nix-command" ];
    };
  };

  testScript = ''
    start_all()

    with subtest("the cache machine serves a signed binary cache"):
        cache.wait_for_unit("multi-user.target")
        cache.succeed("nix store sign --key-file /etc/nix/test-cache.sk --recursive ${payload}")
        cache.succeed("nix copy --to file://${cacheDir} ${payload}")
        cache.succeed("systemctl start binary-cache.service")
        cache.wait_for_open_port(${toString cachePort})

    with subtest("the daemon is up, hardened, and Nix is pointed at it"):
        client.wait_for_unit("substituter.service")
        client.wait_for_open_port(37515)
        client.succeed("curl -fsS ${daemonUrl}/nix-cache-info | grep -q StoreDir")
        client.succeed("systemctl show substituter.service -p Type | grep -qx Type=notify")
        client.succeed("systemctl show substituter.service -p DynamicUser | grep -qx DynamicUser=yes")
        client.succeed("grep -q '${daemonUrl}?priority=10' /etc/nix/nix.conf")
        client.succeed("grep -q '${testPublicKey}' /etc/nix/nix.conf")
        client.succeed("grep -q 'narinfo-cache-negative-ttl = 60' /etc/nix/nix.conf")
        client.wait_until_succeeds(
            "curl -fsS http://cache:${toString cachePort}/nix-cache-info"
        )

    with subtest("a store path is substituted through the daemon"):
        # A separate store, so the path really has to come from a substituter (the VM's own
        # /nix/store shares the host's).
        client.succeed("nix-store --realise ${payload} --store /root/other-store")
        client.succeed("test -x /root/other-store${payload}/bin/hello")
        client.succeed(
            "nix path-info --store /root/other-store --json ${payload} | grep -q '${testPublicKey}'"
        )
        client.succeed(
            "curl -fsS ${daemonUrl}/${builtins.substring 11 32 (toString payload)}.narinfo"
            " | grep -qx 'StorePath: ${payload}'"
        )

    with subtest("a path no source has is refused, not invented"):
        client.fail(
            "nix-store --realise /nix/store/00000000000000000000000000000000-missing "
            "--store /root/other-store"
        )
        client.succeed(
            "curl -s -o /dev/null -w '%{http_code}' "
            "${daemonUrl}/00000000000000000000000000000000.narinfo | grep -qx 404"
        )

    with subtest("the daemon survives and restarts under systemd"):
        client.succeed("systemctl restart substituter.service")
        client.wait_for_unit("substituter.service")
        client.wait_for_open_port(37515)
  '';
}

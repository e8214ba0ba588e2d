# The NixOS options nixos-module/ defines, declared with the types NixOS gives them, plus
# the defaults the real nix module sets (so list merging and ordering are exercised).
{ lib, ... }:

let
  inherit (lib) mkOption types;
  unitValue = types.oneOf [ types.bool types.int types.str types.package (types.listOf types.str) ];
  units = names: mkOption { type = types.listOf types.str; default = [ ]; };
in
{
  options = {
    assertions = mkOption {
      type = types.listOf (types.submodule {
        assertion = mkOption { type = types.bool; };
        message = mkOption { type = types.str; };
      });
      default = [ ];
    };
    warnings = mkOption { type = types.listOf types.str; default = [ ]; };

    # Freeform in NixOS too (a submodule with a settings-format freeformType).
    nix.settings = mkOption { type = types.attrsOf types.json; default = { }; };

    networking.firewall.allowedTCPPorts = mkOption { type = types.listOf types.port; default = [ ]; };
    environment.systemPackages = mkOption { type = types.listOf types.package; default = [ ]; };

    users.groups = mkOption {
      type = types.attrsOf (types.submodule {
        gid = mkOption { type = types.nullOr types.int; default = null; };
        members = mkOption { type = types.listOf types.str; default = [ ]; };
      });
      default = { };
    };

    systemd.services = mkOption {
      type = types.attrsOf (types.submodule {
        description = mkOption { type = types.str; default = ""; };
        documentation = mkOption { type = types.listOf types.str; default = [ ]; };
        wantedBy = units "wantedBy";
        wants = units "wants";
        requires = units "requires";
        after = units "after";
        before = units "before";
        environment = mkOption {
          type = types.attrsOf (types.nullOr (types.either types.str types.package));
          default = { };
        };
        serviceConfig = mkOption { type = types.attrsOf unitValue; default = { }; };
      });
      default = { };
    };
  };

  config.nix.settings = {
    substituters = lib.mkAfter [ "https://cache.nixos.org/" ];
    trusted-public-keys = [ "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=" ];
  };
}

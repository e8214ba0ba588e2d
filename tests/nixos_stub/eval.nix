# Evaluates nixos-module/ with extra config modules the way NixOS would, then fails like
# NixOS does on a failed assertion.  Used by tests/test_nixos_module.py:
#   nix-instantiate --eval --strict --json tests/nixos_stub/eval.nix --arg modules '[ ... ]'
{ modules ? [ ], withSubstituter ? true, module ? ../../nixos-module/default.nix }:

let
  lib = import ./lib.nix;
  pkgs = import ./pkgs.nix { inherit lib withSubstituter; };
  result = lib.evalModules {
    modules = [ ./nixos-base.nix module ] ++ modules;
    specialArgs = { inherit pkgs; };
  };
  inherit (result) config;
  failed = map (a: a.message) (builtins.filter (a: !a.assertion) config.assertions);
  readIfFile = path: if path == null then null else builtins.readFile path;
in
if failed != [ ] then throw "\nFailed assertions:\n${lib.concatMapStringsSep "\n" (m: "- ${m}") failed}"
else {
  inherit (config) warnings nix networking users;
  systemd.services = config.systemd.services;
  environment.systemPackages = map (p: p.name) config.environment.systemPackages;
}

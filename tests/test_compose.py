"""docker-compose.yml without Docker: every service's entrypoint + command run as a local process
(service names and ports mapped to loopback), then a 2-round run through them."""

import json
import re
import time

import pytest
import yaml
from conftest import TINY_OVERRIDES

from launch.processes import console_script, free_port, start_process, stop_process
from launch.simulation import COMPLETED, PROJECT_DIR, LocalSuperLink

pytestmark = pytest.mark.e2e
COMPOSE = PROJECT_DIR / "docker-compose.yml"


def compose_services():
    return yaml.safe_load(COMPOSE.read_text())["services"]


def start_order(services):
    """Services after the ones they depend on."""
    order, pending = [], dict(services)
    while pending:
        ready = [n for n, s in pending.items() if all(d in order for d in s.get("depends_on", []))]
        assert ready, f"dependency cycle among {sorted(pending)}"
        order += sorted(ready)
        for name in ready:
            del pending[name]
    return order


def localize(argv, ports, mirror):
    """Container hostnames and ports → 127.0.0.1 and free ports; the mirror's mount → its folder."""
    out = []
    for arg in map(str, argv):
        for (host, port), local in ports.items():
            arg = arg.replace(f"{host}:{port}", f"127.0.0.1:{local}")
        arg = arg.replace("0.0.0.0", "127.0.0.1").replace("/data/hub", str(mirror))
        out.append(arg)
    return out


def test_compose_file_declares_the_deployment():
    services = compose_services()
    assert {"superlink", "superexec-serverapp", "supernode-1", "supernode-2"} <= set(services)
    assert services["superlink"]["image"].startswith("flwr/superlink:")
    assert "1.41.0" in COMPOSE.read_text()  # the pinned Flower version
    for name in ("superexec-clientapp-1", "superexec-clientapp-2", "superexec-serverapp"):
        assert services[name]["build"]["dockerfile"] == "docker/Dockerfile"
    assert "--clientappio-api-address" not in COMPOSE.read_text()  # removed in Flower 1.40


def test_compose_services_run_two_rounds_as_local_processes(tmp_path, hub_mirror):
    services = compose_services()
    ports = {}
    for name, service in services.items():
        command = list(map(str, service.get("command", [])))
        if "--port" in command:
            ports[(name, command[command.index("--port") + 1])] = free_port()
    link_port = ports[("superlink", "8000")]
    processes = []
    superlink = LocalSuperLink(tmp_path / "flwr", port=link_port, simulation=False)
    superlink.write_connection()
    env = superlink.env()
    try:
        for name in start_order(services):
            service = services[name]
            argv = localize([*service["entrypoint"], *service["command"]], ports, hub_mirror)
            for key, local in ports.items():
                if key[0] == name:  # this service's own --port
                    argv[argv.index("--port") + 1] = str(local)
            argv[0] = console_script(argv[0])  # the image's binary, from this environment
            processes.append(start_process(argv, env, tmp_path, tmp_path / f"{name}.log"))
            time.sleep(2.0 if name == "superlink" else 0.5)
        overrides = " ".join([*TINY_OVERRIDES, "federation.connect_timeout_s=120"])
        output = tmp_path / "out"
        run_config = [
            f"model='tiny_bert' output-dir='{output}' hub-mirror='{hub_mirror}' overrides='{overrides}'"
        ]
        run_id = superlink.submit(PROJECT_DIR, run_config)
        outcome = superlink.follow(run_id, timeout=600, stream=False)
        assert outcome.status == COMPLETED, (outcome, [p.read_text()[-500:] for p in tmp_path.glob("*.log")])
    finally:
        for process in reversed(processes):
            stop_process(process)
    (run_dir,) = (tmp_path / "out").iterdir()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [0, 1, 2]
    assert all(row["clients_aggregated"] == 2 for row in rows[1:])
    assert all(p.poll() is not None for p in processes)
    assert re.search(r"flwr run \. compose", COMPOSE.read_text())

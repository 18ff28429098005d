"""config/demo.yaml moved onto free ports, for the end-to-end tests that run the demo."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.integration.kafka_fixture import free_ports

REPO_ROOT = Path(__file__).resolve().parents[2]


def demo_config(tmp_path: Path) -> tuple[Path, int]:
    """config/demo.yaml moved onto free ports; returns (config path, warehouse port)."""
    cfg = yaml.safe_load((REPO_ROOT / "config" / "demo.yaml").read_text())
    kafka, warehouse, ingest, *buyer_ports = free_ports(3 + len(cfg["simulator"]["buyers"]))
    cfg["kafka"]["bootstrap"] = f"127.0.0.1:{kafka}"
    cfg["clickhouse"]["url"] = f"http://127.0.0.1:{warehouse}"
    cfg["warehouse"]["port"] = warehouse
    cfg["ingest"]["listen"] = f"127.0.0.1:{ingest}"
    # Faust's web servers off: the demo's ports (6064-6066) may be taken by another run.
    cfg.setdefault("worker", {})["web_port"] = 0
    for buyer, port in zip(cfg["buyers"], buyer_ports):
        buyer["ping_url"] = f"http://127.0.0.1:{port}/ping"
        buyer["post_url"] = f"http://127.0.0.1:{port}/post"
        cfg["simulator"]["buyers"][buyer["id"]]["port"] = port
    config = tmp_path / "demo.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return config, warehouse

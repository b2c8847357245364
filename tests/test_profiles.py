"""Hardware profiles: units, validation errors naming file and field, shipped profiles, calibration."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from infinisim.cli import main
from infinisim.core.errors import InfinisimError
from infinisim.hwprofiles.profile import builtin_profiles, load_profile, write_profile
from infinisim.hwprofiles.units import parse_quantity

SHIPPED = ("a6000-pcie3", "a100-40gb-pcie4", "a100-80gb-pcie4", "h100-pcie5", "h100-sxm", "h200", "l4", "rtx4090")


def test_units():
    assert parse_quantity("12.5 GB/s", "bandwidth") == 12.5e9
    assert parse_quantity("48 GiB", "bytes") == 48 * 2**30
    assert parse_quantity("10 us", "time") == pytest.approx(1e-5)
    assert parse_quantity("2 ms", "time") == pytest.approx(2e-3)
    assert parse_quantity("154.8 TFLOP/s", "flops") == pytest.approx(154.8e12)
    assert parse_quantity(3e9, "bandwidth") == 3e9
    for value, dimension in (("48 GB", "bandwidth"), ("10 GB/s", "bytes"), ("fast", "time"), (True, "time"),
                             ("5 parsecs", "time")):
        with pytest.raises(ValueError):
            parse_quantity(value, dimension)


def test_shipped_profiles_load_with_sources():
    assert set(SHIPPED) <= set(builtin_profiles())
    for name in SHIPPED:
        p = load_profile(name)
        assert p.kind == "gpu" and len(p.sources) >= 2
        assert p.link.h2d_bandwidth < p.device.memory_bandwidth  # PCIe is the narrow pipe
    paper = load_profile("a6000-pcie3")
    assert paper.device.memory == 48e9 and paper.link.name == "PCIe 3.0 x16" and paper.host.memory == 96e9


def _write_bad(tmp_path: Path, edit) -> Path:
    data = yaml.safe_load(builtin_profiles()["a6000-pcie3"].read_text())
    edit(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(("edit", "field", "message"), [
    (lambda d: d["device"].update(tensor_cores=1), "device.tensor_cores", "unknown key"),
    (lambda d: d["link"].pop("latency"), "link.latency", "missing field"),
    (lambda d: d["device"].update(matmul_efficiency=1.5), "device.matmul_efficiency", "out of range"),
    (lambda d: d["device"].update(memory="48 GB/s"), "device.memory", "not a bytes unit"),
    (lambda d: d["link"].update(h2d_bandwidth="fast"), "link.h2d_bandwidth", "expected a number"),
    (lambda d: d.update(kind="tpu"), "kind", "'gpu' or 'cpu'"),
    (lambda d: d.update(sources=[]), "sources", "non-empty list"),
    (lambda d: d["link"].update(sweep=[{"bytes": "1 MB", "h2d": "1 GB/s", "d2h": "1 GB/s"},
                                       {"bytes": "4 KB", "h2d": "1 GB/s", "d2h": "1 GB/s"}]),
     "link.sweep", "ascending"),
])
def test_malformed_profile_names_file_and_field(tmp_path, edit, field, message):
    path = _write_bad(tmp_path, edit)
    with pytest.raises(InfinisimError) as err:
        load_profile(path)
    assert str(err.value).startswith(f"{path}: {field}:") and message in str(err.value)


def test_broken_yaml_and_missing_file_via_cli(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\ndevice: [unclosed\n")
    assert main(["profiles", "show", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"infinisim: error: {path}: line ") and "malformed YAML" in err and "\n" not in err
    assert main(["profiles", "show", "no-such-profile"]) == 1
    assert "no such profile" in capsys.readouterr().err


def test_profiles_cli_lists_and_shows(capsys):
    assert main(["profiles", "list"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in SHIPPED)
    assert main(["profiles", "show", "h100-sxm"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert parse_quantity(shown["device"]["memory_bandwidth"], "bandwidth") == 3350e9 and shown["sources"]
    assert shown["device"]["memory_bandwidth"] == "3.35 TB/s"  # with its unit, as the shipped file writes it


def test_quick_calibration_writes_a_loadable_profile(tmp_path, capsys):
    out = tmp_path / "me.yaml"
    assert main(["calibrate", "--quick", "--out", str(out), "--name", "this-box"]) == 0
    p = load_profile(out)
    assert p.name == "this-box" and p.kind == "cpu" and p.synchronous
    d = p.device
    assert d.memory_bandwidth > 1e8 and d.launch_overhead > 0 and d.matmul_sweep and d.stream_sweep
    assert d.selection_per_score > 0 and d.speculation_sweep and d.prefill_attention_sweep and p.link.sweep
    assert [t for t, _, _ in d.prefill_block_sweep] == [64, 256] and min(min(r[1:]) for r in d.prefill_block_sweep) > 0
    assert [b for b, _ in d.decode_block_sweep] == [1, 4] and min(f for _, f in d.decode_block_sweep) > 0
    assert 0 < d.decode_layer_host < 1e-2  # the block's decode outside its phases, a layer
    assert [m for m, _ in d.wide_stream_sweep] == [1, 8] and min(bw for _, bw in d.wide_stream_sweep) > 1e8
    assert load_profile(write_profile(p, tmp_path / "again.yaml")).to_dict() == p.to_dict()

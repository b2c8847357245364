"""The trace contract: round trip, validation errors, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from infinisim.core.errors import InfinisimError
from infinisim.executor.generate import SamplingConfig
from infinisim.executor.kvcache import Measurement
from infinisim.executor.loaders import load_model
from infinisim.executor.recording import run_policy
from infinisim.traces import trace as trace_module
from infinisim.traces.summary import summarize
from infinisim.traces.trace import METADATA_KEY, decode_selection, encode_selection, read_trace, write_trace


@pytest.fixture(scope="module")
def tiny_trace():
    loaded = load_model("smollm2-135m", "float32", "cpu", random_weights=True)
    _, trace = run_policy(loaded.model, [[1, 2, 3, 4, 7, 8, 9], [5, 6]], "infinigen",
                          SamplingConfig(5, stop_at_eos=False), {"model": "smollm2-135m", "weights": "random"})
    return trace


def _rewrite_header(src: Path, dst: Path, edit) -> None:
    table = pq.read_table(src)
    header = json.loads(table.schema.metadata[METADATA_KEY])
    edit(header)
    pq.write_table(table.replace_schema_metadata({METADATA_KEY: json.dumps(header).encode()}), dst)


def test_round_trip(tiny_trace, tmp_path):
    path = write_trace(tiny_trace, tmp_path / "t.trace.parquet")
    back = read_trace(path)
    assert back.model == tiny_trace.model
    assert back.run == json.loads(json.dumps(tiny_trace.run))
    assert back.environment == tiny_trace.environment
    assert back.steps.equals(tiny_trace.steps)
    assert back.layers.equals(tiny_trace.layers)
    assert len(back.layers) == 5 * back.model.n_layers
    summary = summarize(back)
    assert summary["decode_steps"] == 4 and summary["bytes_h2d_total"] > 0
    speculated = back.layers[back.layers.layer == 4].set_index("step").alpha_counts
    assert len(speculated[1]) == 3 * 9 and len(speculated[2]) == 0  # KV heads x alphas, every 8th decode step


def test_quality_runs_count_alpha_on_every_step(five_layer_smollm2):
    """--quality traces feed the planner's alpha axis: their counts cover every decode step (the share
    varies up to 2x between steps); timing runs keep every 8th."""
    _, trace = run_policy(five_layer_smollm2, [list(range(10, 60))], "infinigen", SamplingConfig(10, stop_at_eos=False),
                          {"model": "x", "weights": "random"}, measure=Measurement(quality=True))
    assert trace.run["alpha_counts_every"] == 1
    speculating = trace.layers[(trace.layers.layer == 4) & (trace.layers.step > 0)]
    assert len(speculating) == 9 and (speculating.alpha_counts.map(len) == 3 * 9).all()
    assert Measurement().alpha_counts_every == 8
    assert Measurement(quality=True, alpha_counts_every=2).alpha_counts_every == 2


def test_selection_coding_round_trip():
    indices = np.array([[[7, 2, 5, 0], [3, 1, 9, 4]], [[6, 0, 2, 8], [5, 4, 3, 2]]])  # [B=2, G=2, n=4]
    keep = np.array([[[1, 1, 1, 0], [1, 1, 1, 1]], [[1, 0, 0, 0], [0, 0, 0, 0]]], dtype=bool)
    values = encode_selection(indices, keep)
    assert values == [3, 2, 3, 2, 4, 1, 2, 1, 5, 1, 6, 0]
    back = decode_selection(values, 2, 2)
    assert [h.tolist() for h in back[0]] == [[2, 5, 7], [1, 3, 4, 9]]
    assert [h.tolist() for h in back[1]] == [[6], []]
    with pytest.raises(ValueError, match="left over"):
        decode_selection(values, 1, 2)


def test_recorded_selection_matches_fetch_counts(tmp_path):
    loaded = load_model("smollm2-135m", "float32", "cpu", random_weights=True)
    _, trace = run_policy(loaded.model, [list(range(10, 70)), list(range(100, 130))], "infinigen",
                          SamplingConfig(3, stop_at_eos=False), {"model": "smollm2-135m", "weights": "random"},
                          knobs={"budget": 0.25, "dense_layers": 1}, measure=Measurement(record_selection=True))
    back = read_trace(write_trace(trace, tmp_path / "sel.trace.parquet"))
    decode = back.layers[back.layers.step > 0]
    assert (decode[decode.layer == 0].selected.map(len) == 0).all()  # the dense first layer does not select
    for row in decode[decode.layer > 0].itertuples():
        heads = decode_selection(row.selected, 2, back.model.n_kv_heads)
        kept = [len(h) for seq in heads for h in seq]
        assert max(kept) <= row.tokens_fetched <= max(row.kv_len - 1, 1)
        for seq, prompt_len in zip(heads, (60, 30), strict=True):
            for h in seq:
                assert len(np.unique(h)) == len(h) and h.max() < row.kv_len - 1
                assert h.min() >= 60 - prompt_len  # the short prompt's left padding is never fetched


def test_trace_without_optional_column_reads(tiny_trace, tmp_path):
    path = write_trace(tiny_trace, tmp_path / "t.trace.parquet")
    table = pq.read_table(path)
    header = json.loads(table.schema.metadata[METADATA_KEY])
    old = table.drop_columns(["selected"])
    header.pop("content_hash")
    header["content_hash"] = trace_module._content_hash(header, old)
    pq.write_table(old.replace_schema_metadata({METADATA_KEY: json.dumps(header).encode()}), tmp_path / "old.parquet")
    back = read_trace(tmp_path / "old.parquet")
    assert (back.layers.selected.map(len) == 0).all() and back.layers.attn_s.equals(tiny_trace.layers.attn_s)


def test_truncated_file(tiny_trace, tmp_path):
    path = write_trace(tiny_trace, tmp_path / "t.trace.parquet")
    data = path.read_bytes()
    cut = tmp_path / "cut.trace.parquet"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(InfinisimError, match=r"cut\.trace\.parquet: not a readable trace \(truncated"):
        read_trace(cut)


def test_wrong_schema_version(tiny_trace, tmp_path):
    path = write_trace(tiny_trace, tmp_path / "t.trace.parquet")
    _rewrite_header(path, tmp_path / "v.parquet", lambda h: h.update(version=99))
    with pytest.raises(InfinisimError, match=r"v\.parquet: header\.version: schema version 99 is not supported"):
        read_trace(tmp_path / "v.parquet")


def test_missing_header_field(tiny_trace, tmp_path):
    path = write_trace(tiny_trace, tmp_path / "t.trace.parquet")
    _rewrite_header(path, tmp_path / "m.parquet", lambda h: h["run"].pop("batch"))
    with pytest.raises(InfinisimError, match=r"m\.parquet: header\.run\.batch: missing field"):
        read_trace(tmp_path / "m.parquet")


def test_missing_column(tiny_trace, tmp_path):
    path = write_trace(tiny_trace, tmp_path / "t.trace.parquet")
    table = pq.read_table(path)
    pq.write_table(table.drop_columns(["bytes_h2d"]).replace_schema_metadata(table.schema.metadata),
                   tmp_path / "c.parquet")
    with pytest.raises(InfinisimError, match=r"c\.parquet: bytes_h2d: missing column"):
        read_trace(tmp_path / "c.parquet")


def test_modified_contents_fail_the_hash(tiny_trace, tmp_path):
    path = write_trace(tiny_trace, tmp_path / "t.trace.parquet")
    _rewrite_header(path, tmp_path / "h.parquet", lambda h: h["steps"][1].update(wall_s=123.0))
    with pytest.raises(InfinisimError, match="content_hash: does not match"):
        read_trace(tmp_path / "h.parquet")


def test_not_a_trace(tmp_path):
    (tmp_path / "x.parquet").write_text("hello")
    with pytest.raises(InfinisimError, match="not a readable trace"):
        read_trace(tmp_path / "x.parquet")
    with pytest.raises(InfinisimError, match="no such trace file"):
        read_trace(tmp_path / "absent.parquet")


def test_interrupted_write_leaves_nothing(tiny_trace, tmp_path, monkeypatch):
    target = tmp_path / "t.trace.parquet"

    def interrupted(table, where, **kwargs):
        where.write(b"PAR1 partial bytes")
        raise KeyboardInterrupt

    monkeypatch.setattr(trace_module.pq, "write_table", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_trace(tiny_trace, target)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_overwrite_keeps_the_old_trace(tiny_trace, tmp_path, monkeypatch):
    target = write_trace(tiny_trace, tmp_path / "t.trace.parquet")
    before = target.read_bytes()
    monkeypatch.setattr(trace_module.pq, "write_table", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        write_trace(tiny_trace, target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["t.trace.parquet"]

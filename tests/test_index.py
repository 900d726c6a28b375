"""core/index.py: exact search and the plan of an incremental build (no Ray, no MLflow)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.index import SCHEMA, IndexMeta, VideoIndex, normalise, plan_update, read_meta, read_rows, write_index


def rows(entries: list[tuple[str, str, int, int, list[float]]]) -> pa.Table:
    return pa.Table.from_pylist([dict(zip(SCHEMA.names, entry)) for entry in entries], schema=SCHEMA)


def test_search_ranks_by_cosine_best_first():
    embeddings = normalise(np.array([[1, 0, 0], [0.6, 0.8, 0], [0, 0, 1], [-1, 0, 0]], np.float32))
    index = VideoIndex(None, None, ["a", "b", "c", "d"], ["/a", "/b", "/c", "/d"], embeddings)
    hits = index.search(np.array([3.0, 1.0, 0.0]), k=3)  # not normalised: the index normalises it
    assert [h.video_id for h in hits] == ["a", "b", "c"] and [h.rank for h in hits] == [1, 2, 3]
    assert [h.score for h in hits] == pytest.approx([3 / np.sqrt(10), 2.6 / np.sqrt(10), 0.0], abs=1e-6)
    assert hits[0].path == "/a"
    assert [h.video_id for h in index.search(np.array([-1.0, 0, 0]), k=10)] == ["d", "c", "b", "a"]  # k > videos
    with pytest.raises(ValueError, match="at least 1"):
        index.search(np.ones(3), k=0)
    with pytest.raises(ValueError, match="the query has 2 dimensions, the index 3"):
        index.search(np.ones(2), k=1)


def test_an_incremental_build_embeds_what_is_new_or_changed_and_drops_what_left():
    existing = rows([("same", "/v/same.mp4", 10, 100, [1.0]), ("touched", "/v/t.mp4", 10, 100, [1.0]),
                     ("resized", "/v/r.mp4", 10, 100, [1.0]), ("moved", "/v/m.mp4", 10, 100, [1.0]),
                     ("gone", "/v/g.mp4", 10, 100, [1.0])])
    wanted = [{"video_id": "same", "path": "/v/same.mp4", "size": 10, "mtime": 100},
              {"video_id": "touched", "path": "/v/t.mp4", "size": 10, "mtime": 101},
              {"video_id": "resized", "path": "/v/r.mp4", "size": 11, "mtime": 100},
              {"video_id": "moved", "path": "/w/m.mp4", "size": 10, "mtime": 100},
              {"video_id": "new", "path": "/v/n.mp4", "size": 10, "mtime": 100}]
    todo, keep = plan_update(existing, wanted)
    assert [row["video_id"] for row in todo] == ["touched", "resized", "moved", "new"]
    assert keep.column("video_id").to_pylist() == ["same"]
    todo, keep = plan_update(SCHEMA.empty_table(), wanted)  # a new index embeds everything
    assert len(todo) == 5 and keep.num_rows == 0


def test_an_index_is_written_whole_and_read_back(tmp_path):
    meta = IndexMeta("models:/m/1", {"name": "m", "version": "1"}, "model/student.pt", 2, 4, 32,
                     failures=[{"video_id": "x", "reason": "corrupt", "detail": "bad"}])
    write_index(tmp_path, rows([("a", "/a", 1, 2, [0.6, 0.8])]), meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["embeddings.parquet", "index.json"]  # no temp file left
    again = read_meta(tmp_path)
    assert again == meta and again.videos == 1
    assert read_rows(tmp_path).column("video_id").to_pylist() == ["a"]
    index = VideoIndex.load(tmp_path)
    np.testing.assert_allclose(index.embeddings, [[0.6, 0.8]])
    assert index.model_path == tmp_path / "model" / "student.pt"
    assert again.same_model(IndexMeta("models:/m@champion", {"name": "m", "version": "1"}, "", 2, 4, 32))
    assert not again.same_model(IndexMeta("models:/m/2", {"name": "m", "version": "2"}, "", 2, 4, 32))
    local = IndexMeta("s.pt", {"size": "10", "mtime_ns": "5"}, "", 2, 4, 32)
    assert local.same_model(IndexMeta("s.pt", {"size": "10", "mtime_ns": "5"}, "", 2, 4, 32))
    assert not local.same_model(IndexMeta("s.pt", {"size": "10", "mtime_ns": "6"}, "", 2, 4, 32))  # written again
    assert not local.same_model(IndexMeta("t.pt", {"size": "10", "mtime_ns": "5"}, "", 2, 4, 32))
    with pytest.raises(FileNotFoundError, match="no video index at"):
        read_meta(tmp_path / "nowhere")


def test_a_large_index_searches_an_hnsw_graph_and_a_small_one_exactly(tmp_path):
    """At `exact_below` videos or more the index gets an HNSW graph beside its rows, and search
    answers from it: here (200 videos, well inside what the graph finds exactly) the same hits as
    the matrix product. Written again below the threshold, the graph goes; a graph that does not
    match the rows (another build's) is ignored, not trusted."""
    from core.index import ANN_FILE

    rng = np.random.default_rng(0)
    emb = normalise(rng.standard_normal((200, 16)))
    table = rows([(f"v{i:03d}", f"/v{i}", 1, 2, list(e)) for i, e in enumerate(emb)])
    meta = IndexMeta("s.pt", {}, "model", 16, 4, 32)
    write_index(tmp_path, table, meta, exact_below=100)
    assert (tmp_path / ANN_FILE).is_file() and read_meta(tmp_path).search == "hnsw"
    graph = VideoIndex.load(tmp_path)
    assert graph.ann is not None and graph.ann.size == 200
    exact = VideoIndex(tmp_path, meta, graph.ids, graph.paths, graph.embeddings)
    for query in rng.standard_normal((20, 16)):
        got, want = graph.search(query, 5), exact.search(query, 5)
        assert [h.video_id for h in got] == [h.video_id for h in want]
        assert [round(h.score, 4) for h in got] == [round(h.score, 4) for h in want]
    assert len(graph.search(emb[0], 500)) == 200  # a k the graph may not fill: exact, all of it

    write_index(tmp_path, table.slice(0, 50), IndexMeta("s.pt", {}, "model", 16, 4, 32), exact_below=100)
    assert not (tmp_path / ANN_FILE).exists() and VideoIndex.load(tmp_path).ann is None
    write_index(tmp_path, table, IndexMeta("s.pt", {}, "model", 16, 4, 32), exact_below=100)
    pq.write_table(table.slice(0, 150), tmp_path / "embeddings.parquet")  # rows replaced, graph left behind
    assert VideoIndex.load(tmp_path).ann is None


def test_a_served_query_is_checked_before_it_is_encoded(tmp_path):
    """The server's own checks, each a one-line reason: empty or overlong queries, k outside 1..100,
    and indexes that are not there or share a name."""
    from jobs.serve import MAX_K, BadRequest, ServedIndex, parse_query, search_page

    assert parse_query("  a red car ", None) == ("a red car", 5) and parse_query("car", "100") == ("car", 100)
    for q, k, reason in (("", "3", "the query is empty"), ("car", "0", f"between 1 and {MAX_K}"),
                         ("car", "101", f"between 1 and {MAX_K}"), ("car", "2.5", "whole number"),
                         ("x" * 501, "3", "at most 500")):
        with pytest.raises(BadRequest, match=reason) as refused:
            parse_query(q, k)
        assert refused.value.status == 400
    for name in ("a/index", "b/index"):
        write_index(tmp_path / name, SCHEMA.empty_table(), IndexMeta("student.pt", {}, "model", 8, 4, 32))
    with pytest.raises(ValueError, match="two indexes named 'index'"):
        ServedIndex.from_dirs([tmp_path / "a" / "index", tmp_path / "b" / "index"])
    with pytest.raises(FileNotFoundError, match="no video index at"):
        ServedIndex.from_dirs([tmp_path / "a"])
    assert 'value="&lt;script&gt;"' in search_page(["index"], "index", "<script>")  # a query is text, not markup

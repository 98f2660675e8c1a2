"""Planning the crawl: URL lists read by reference (ingest/reader.py), their growth and changes, the dry
run, bad input, Flickr paging and the warning for engines that find nothing. Loopback only."""
import json
import logging
import os
import queue
import random
import re
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from maskless import cli
from maskless.core import shards, storage
from maskless.ingest import reader
from maskless.ingest.crawl import LISTS_DIR, CrawlConfig, plan_crawl, plan_units, run_crawl
from maskless.ingest.engines import ENGINES
from maskless.ingest.reader import ListOptions, find_lists, plan_list, save_ledgers

from test_crawl import encode, fast_config, key_of, serve, smooth_image, write_urls  # noqa: F401 (serve: a fixture)

LABEL_COLS = ["label", "labels", "tags"]


def list_folder(root, urls: list[str]) -> tuple[dict[str, list[str]], Counter]:
    """A folder of URL lists in every format, with the quirks lists have: blank and comment lines before
    the header, swapped columns, CRLF, extra label cells, no final newline, a byte-order mark, a bad JSON
    line, a row without a label, files a folder of lists also holds. Returns url -> labels in list
    order, and the rejects expected (reason -> count)."""
    os.makedirs(root, exist_ok=True)
    it = iter(urls)
    rows: dict[str, list[str]] = {}

    def take(*labels):
        url = next(it)
        rows[url] = list(labels)
        return url
    a = [take("cat"), take("dog", "cow"), take("bird")]
    with open(os.path.join(root, "a.csv"), "w", newline="") as f:
        f.write(f"\r\n# made by hand\r\n\r\nlabel,url\r\ncat,{a[0]}\r\ndog,{a[1]},cow\r\n\r\n# note\r\nbird,{a[2]}")
    b = [take("cat", "dog"), take("dog")]
    with open(os.path.join(root, "b.tsv"), "w") as f:
        f.write(f"url\ttags\n{b[0]}\tcat|dog\n{b[1]}\tdog\n")
    c = [take("horse"), take("horse")]
    with open(os.path.join(root, "horse.txt"), "w") as f:
        f.write(f"{c[0]}\n\n{c[1]}\n")
    d = [take("a", "b"), take("c")]
    no_label = next(it)
    with open(os.path.join(root, "d.jsonl"), "w") as f:
        f.write(json.dumps({"url": d[0], "label": ["a", "b"]}) + "\nnot json\n" + json.dumps({"url": d[1], "label": "c"})
                + "\n" + json.dumps({"url": no_label, "other": 1}) + "\n")
    e = [take("p", "q") for _ in range(7)]
    pq.write_table(pa.table({"url": e, "labels": [["p", "q"]] * 7}), os.path.join(root, "e.parquet"), row_group_size=3)
    g = [take("z", "y"), take("w")]
    with open(os.path.join(root, "g.csv"), "w", encoding="utf-8-sig") as f:
        f.write(f"{g[0]},z,y\n{g[1]},w\n")  # no header, a byte-order mark: url,label[,label...]
    for ignored in ("_SUCCESS", ".hidden.csv", "README.md"):
        with open(os.path.join(root, ignored), "w") as f:
            f.write("not a list\n")
    return rows, Counter({"bad_row": 1, "no_label": 1})


def slice_rows(units):
    got, rejects = [], Counter()
    for u in units:
        rows, bad = u.source.read()
        got += rows
        rejects.update(reason for _, reason in bad)
    return got, rejects


@pytest.mark.parametrize("head_bytes", [reader.HEAD_BYTES, 40])
def test_every_row_of_a_folder_of_lists_lands_in_exactly_one_unit(tmp_path, monkeypatch, head_bytes):
    """Heads of 40 bytes: the planner cuts by bytes beyond the first line, as it does in a big list."""
    monkeypatch.setattr(reader, "HEAD_BYTES", head_bytes)
    expected, expected_rejects = list_folder(tmp_path / "lists", [f"http://h.test/{i}.jpg" for i in range(20)])
    for shard_size in (1, 2, 3, 100):
        cfg = CrawlConfig(engine=["urls"], urls=[str(tmp_path / "lists")], label_col=LABEL_COLS, label_sep="|",
                          shard_size=shard_size, out=str(tmp_path / "out"))
        units = plan_units(cfg)
        got, rejects = slice_rows(units)
        assert Counter(url for url, _ in got) == Counter(list(expected)), shard_size  # each row once
        assert {url: list(labels) for url, labels in got} == expected
        assert rejects == expected_rejects
        assert len({u.name for u in units}) == len(units) and [u.name for u in plan_units(cfg)] == [u.name for u in units]
        assert all(len(u.source.read()[0]) <= shard_size for u in units if u.source.format == "parquet")
    assert not os.path.exists(tmp_path / "out")  # planning writes nothing


def test_text_ranges_split_at_line_starts_whatever_the_cut(tmp_path, monkeypatch):
    """The split-at-newline rule over random lists, heads and shard sizes; then the same list grown by
    appended rows keeps every earlier slice, and its new slices hold exactly the new rows."""
    rng = random.Random(7)
    for trial in range(150):
        monkeypatch.setattr(reader, "HEAD_BYTES", rng.choice([16, 50, 200, 65536]))
        n = rng.randrange(1, 50)
        lines, expected = (["url,label"] if rng.random() < 0.5 else []), []
        for i in range(n):
            lines += [""] * (rng.random() < 0.1) + ["# c"] * (rng.random() < 0.1)
            url = f"http://h.test/{i}{'x' * rng.randrange(40)}.jpg"
            lines.append(f"{url},l{i % 3}")
            expected.append((url, (f"l{i % 3}",)))
        nl = rng.choice(["\n", "\r\n"])
        path = tmp_path / f"l{trial}.csv"
        path.write_bytes((nl.join(lines) + nl).encode())
        shard_size = rng.choice([1, 2, 3, 5, 100])
        (file,) = find_lists([str(path)])
        plan = plan_list(file, ListOptions(), shard_size)
        assert [r for s in plan.slices for r in s.read()[0]] == expected, trial
        if plan.rows_exact:
            assert plan.slice_rows == [len(s.read()[0]) for s in plan.slices]
        more = [f"http://h.test/m{i}.jpg" for i in range(rng.randrange(1, 30))]
        with open(path, "ab") as f:
            f.write("".join(f"{u},m{nl}" for u in more).encode())
        os.utime(path, ns=(file.mtime_ns, file.mtime_ns + 10**9))
        (grown,) = find_lists([str(path)])
        again = plan_list(grown, ListOptions(), shard_size, plan.ledger)
        assert again.status == "grown" and again.slices[:len(plan.slices)] == plan.slices
        assert [r for s in again.slices[len(plan.slices):] for r in s.read()[0]] == [(u, ("m",)) for u in more]


def test_a_rewritten_list_is_detected_and_reported(tmp_path, caplog):
    path = write_urls(tmp_path / "u.csv", [(f"http://h.test/{i}.jpg", "cat") for i in range(6)])
    cfg = CrawlConfig(engine=["urls"], urls=path, shard_size=2, out=str(tmp_path / "out"))
    first = plan_crawl(cfg)
    save_ledgers(storage.join(cfg.out, LISTS_DIR), first.lists)
    assert [fp.status for fp in plan_crawl(cfg).lists] == ["unchanged"]
    os.utime(path, ns=(0, 10**18))  # touched, not changed: the same units
    touched = plan_crawl(cfg)
    assert [fp.status for fp in touched.lists] == ["unchanged"] and touched.units == first.units
    with open(path, "r+") as f:  # one row rewritten in place, same size
        f.seek(len("url,label\n") + 17)
        f.write("X")
    changed = plan_crawl(cfg)
    assert [fp.status for fp in changed.lists] == ["changed"] and "u.csv changed since" in caplog.text
    assert not {u.name for u in changed.units} & {u.name for u in first.units}  # the new version's own units
    with open(path, "w") as f:  # shorter: changed as well
        f.write("url,label\nhttp://h.test/0.jpg,cat\n")
    assert [fp.status for fp in plan_crawl(cfg).lists] == ["changed"]


def tree(root) -> dict:
    """Every file under root with its size and mtime: what 'untouched' means."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            st = os.stat(os.path.join(folder, name))
            out[os.path.relpath(os.path.join(folder, name), root)] = (st.st_size, st.st_mtime_ns)
    return out


def image_server(serve, n: int, seed: int = 0):
    bodies = [encode(smooth_image(seed + i)) for i in range(n)]
    srv = serve({f"/{i}.jpg": (200, {"Content-Type": "image/jpeg"}, b) for i, b in enumerate(bodies)})
    return srv, [f"{srv.url}/{i}.jpg" for i in range(n)], {f"{srv.url}/{i}.jpg": key_of(b) for i, b in enumerate(bodies)}


def test_crawl_of_a_folder_of_lists_gets_every_row_once_and_grows_by_new_units(ray_local, serve, tmp_path):
    srv, urls, key = image_server(serve, 26, seed=400)
    folder = tmp_path / "lists"
    expected, _ = list_folder(folder, urls)
    cfg = fast_config(tmp_path, urls=["file://" + str(folder)], label_col=LABEL_COLS, label_sep="|", shard_size=2,
                      near_dup_bits=-1)
    summary = run_crawl(cfg)
    got = {s.meta["url"]: s.labels for s in shards.read_dataset(cfg.out)}
    assert Counter(s.key for s in shards.read_dataset(cfg.out)) == Counter(key[u] for u in expected)  # once each
    assert got == {u: sorted(ls) for u, ls in expected.items()}
    assert all(srv.hits[u[len(srv.url):]] == 1 for u in expected)
    assert summary["url_lists"] == {"files": 6, "new": 6, "unchanged": 0, "grown": 0, "changed": []}
    assert summary["by_engine_class"]["urls/(list)"]["rejected"] == {"bad_row": 1, "no_label": 1}
    units_root = os.path.join(cfg.out, "_units")
    before = {n: os.stat(os.path.join(units_root, n + ".tar")).st_mtime_ns for n in shards.shard_names(units_root)}
    assert len(before) == summary["units"]

    # rows appended to one list and a new list beside them: only new units, only the new URLs fetched
    with open(folder / "horse.txt", "a") as f:
        f.write(f"{urls[21]}\n{urls[22]}\n{urls[23]}\n")
    write_urls(folder / "more.csv", [(urls[24], "cat")])
    hits = dict(srv.hits)
    again = run_crawl(cfg)
    assert again["url_lists"] == {"files": 7, "new": 1, "unchanged": 5, "grown": 1, "changed": []}
    assert again["units_already_done"] == len(before) and again["units_run"] == 3  # 2 for 3 rows, 1 for 1 row
    assert {p: n - hits.get(p, 0) for p, n in srv.hits.items() if n != hits.get(p, 0)} == {
        f"/{i}.jpg": 1 for i in (21, 22, 23, 24)}
    for name, mtime in before.items():
        assert os.stat(os.path.join(units_root, name + ".tar")).st_mtime_ns == mtime
    got = {s.meta["url"]: s.labels for s in shards.read_dataset(cfg.out)}
    assert got == {**{u: sorted(ls) for u, ls in expected.items()}, urls[21]: ["horse"], urls[22]: ["horse"],
                   urls[23]: ["horse"], urls[24]: ["cat"]}

    # a list rewritten in place is reported, and its new version crawled as new units
    write_urls(folder / "more.csv", [(urls[25], "cat")])
    changed = run_crawl(cfg)
    assert changed["url_lists"]["changed"] == [str(folder / "more.csv")] and changed["units_run"] == 1
    assert srv.hits["/25.jpg"] == 1


def test_csv_header_after_blank_lines_and_columns_by_name(ray_local, serve, tmp_path):
    """Issue #14 item 9: a header after blank and comment lines is a header, and `label,url` maps by name."""
    srv, urls, key = image_server(serve, 2, seed=430)
    (tmp_path / "late.csv").write_text(f"\n\n# exported\nurl,label\n{urls[0]},cat\n")
    (tmp_path / "swapped.csv").write_text(f"label,url\ndog,{urls[1]}\n")
    for name, url, label in (("late", urls[0], "cat"), ("swapped", urls[1], "dog")):
        cfg = fast_config(tmp_path, urls=str(tmp_path / f"{name}.csv"), out=str(tmp_path / name))
        summary = run_crawl(cfg)
        assert {s.key: s.labels for s in shards.read_dataset(cfg.out)} == {key[url]: [label]}
        assert summary["by_engine_class"]["urls/(list)"]["found"] == 1  # the header was never taken for a URL
    assert {p: n for p, n in srv.hits.items() if p != "/robots.txt"} == {"/0.jpg": 1, "/1.jpg": 1}


def test_dry_run_plans_and_prints_without_a_request_or_a_write(serve, tmp_path, monkeypatch, capsys):
    srv, urls, _ = image_server(serve, 5, seed=440)
    lists = write_urls(tmp_path / "u.csv", [(u, "cat") for u in urls])
    monkeypatch.setattr("maskless.ray_runtime.init_ray", lambda *a, **k: pytest.fail("a dry run started Ray"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier command's file")
    before = tree(out)
    rc = cli.main(["crawl", "--dry-run", "--engine", "urls,bing", "--keywords", "car", "--images-per-query", "50",
                   "--shard-size", "2", "--urls", lists, "--out", str(out)])
    assert rc == 0
    plan = json.loads(capsys.readouterr().out)
    pages = -(-50 // ENGINES["bing"].page_size)  # bing's windows of 20 results: 20 + 20 + 10
    assert plan["dry_run"] and plan["units"] == plan["units_to_run"] == 3 + 3
    assert plan["by_engine_class"]["urls/(list)"] == {"units": 3, "units_to_run": 3, "rows": 5, "rows_exact": True}
    assert plan["by_engine_class"]["bing/car"] == {"units": 3, "units_to_run": 3, "results": 50}
    assert plan["requests_estimate"]["images"] == 55 and plan["requests_estimate"]["result_pages"] == pages
    assert plan["url_lists"]["new"] == 1 and len(plan["first_units"]) == 5
    assert srv.requests == 0 and tree(out) == before
    assert cli.main(["crawl", "--dry-run", "--engine", "urls", "--urls", lists, "--out", str(tmp_path / "new")]) == 0
    assert not os.path.exists(tmp_path / "new")


def test_a_failing_command_leaves_a_finished_crawl_finished(ray_local, serve, tmp_path, monkeypatch, capsys):
    """Issue #14 item 6: bad input is found before OUT is touched."""
    srv, urls, _ = image_server(serve, 2, seed=450)
    cfg = fast_config(tmp_path, urls=write_urls(tmp_path / "u.csv", [(u, "cat") for u in urls]))
    run_crawl(cfg)
    info = shards.read_dataset_info(cfg.out)
    before = tree(cfg.out)
    (tmp_path / "nolabel.csv").write_text(f"{urls[0]}\n")
    (tmp_path / "nourl.csv").write_text(f"link,label\n{urls[0]},cat\n")
    monkeypatch.setattr("maskless.ray_runtime.init_ray", lambda *a, **k: None)
    for bad in ("nolabel.csv", "nourl.csv", "missing.csv"):
        rc = cli.main(["crawl", "--engine", "urls", "--urls", str(tmp_path / bad), "--out", cfg.out])
        assert rc == 2, bad
        assert tree(cfg.out) == before and shards.read_dataset_info(cfg.out) == info
    assert "no label" in capsys.readouterr().err


def test_bad_lists_are_clear_errors(tmp_path, monkeypatch, capsys):
    """Exit 2 naming the file and what it has; a list that does not exist is found before Ray starts
    (missing columns are found while planning, after Ray starts and before OUT is touched)."""
    started = []
    monkeypatch.setattr("maskless.ray_runtime.init_ray", lambda *a, **k: started.append(1))
    (tmp_path / "nourl.csv").write_text("link,tag\nhttp://h.test/a.jpg,cat\n")
    (tmp_path / "nolabel.tsv").write_text("url\tcaption\nhttp://h.test/a.jpg\ta cat\n")
    (tmp_path / "nourl.jsonl").write_text('{"link": "http://h.test/a.jpg", "label": "cat"}\n')
    pq.write_table(pa.table({"URL": ["http://h.test/a.jpg"], "caption": ["a cat"]}), tmp_path / "bad.parquet")
    (tmp_path / "empty").mkdir()
    (tmp_path / "list.xlsx").write_text("x")
    cases = {
        "nourl.csv": r"has no column 'url' \(--url-col\); its columns: link, tag",
        "nolabel.tsv": r"has no label column 'label' or 'labels'.*its columns: url, caption",
        "nourl.jsonl": r"has no column 'url'.*its columns: link, label",
        "bad.parquet": r"has no column 'url'.*its columns: URL, caption",
        "missing.csv": r"URL list .*missing.csv not found",
        "empty": r"folder .*empty holds no URL list",
        "*.nothing": r"no URL list matches",
        "list.xlsx": r"list.xlsx: unknown type",
    }
    for name, message in cases.items():
        started.clear()
        assert cli.main(["crawl", "--engine", "urls", "--urls", str(tmp_path / name), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("maskless: error: ") and re.search(message, err), (name, err)
        assert started == ([] if "column" not in message else [1]), name
    uri = "file://" + str(tmp_path / "gone" / "list.parquet")
    started.clear()
    assert cli.main(["crawl", "--engine", "urls", "--urls", uri, "--out", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err and not started and not os.path.exists(tmp_path / "o")
    assert [f.path for f in find_lists([str(tmp_path / "no*.*")])] == [str(tmp_path / n) for n in
                                                                        ("nolabel.tsv", "nourl.csv", "nourl.jsonl")]
    # the names are options: the same lists read with their own columns
    ok = CrawlConfig(engine=["urls"], urls=str(tmp_path / "bad.parquet"), url_col="URL", label_col=["caption"])
    assert [u.source.read()[0] for u in plan_units(ok)] == [[("http://h.test/a.jpg", ("a cat",))]]


def corrupt_row_group(path: str, group: int) -> None:
    """Overwrite the pages of one row group's first column, leaving the footer intact."""
    col = pq.ParquetFile(path).metadata.row_group(group).column(0)
    start = col.dictionary_page_offset or col.data_page_offset
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(b"\xab" * col.total_compressed_size)


def test_an_unreadable_slice_fails_its_unit_alone_and_a_rerun_retries_only_it(ray_local, serve, tmp_path):
    srv, urls, key = image_server(serve, 9, seed=460)
    path = str(tmp_path / "list.parquet")
    pq.write_table(pa.table({"url": urls, "label": ["cat"] * 9}), path, row_group_size=3)
    corrupt_row_group(path, 1)
    cfg = fast_config(tmp_path, urls=path, shard_size=3, near_dup_bits=-1)
    with pytest.raises(RuntimeError, match="1 of 3 crawl units failed"):
        run_crawl(cfg)
    summary = storage.read_json(os.path.join(cfg.out, "crawl_summary.json"))
    (failed,) = summary["units_failed"]
    assert f"cannot read {path} rows 3-6" in failed["error"]
    assert {s.key for s in shards.read_dataset(storage.join(cfg.out, "_units"))} == {
        key[u] for u in urls[:3] + urls[6:]}
    hits = srv.requests
    with pytest.raises(RuntimeError, match="1 of 3 crawl units failed"):
        run_crawl(cfg)
    again = storage.read_json(os.path.join(cfg.out, "crawl_summary.json"))
    assert again["units_already_done"] == 2 and again["units_run"] == 0
    assert [f["unit"] for f in again["units_failed"]] == [failed["unit"]] and srv.requests == hits


def test_flickr_units_ask_for_the_pages_of_their_own_results(monkeypatch):
    """Issue #15 item 4: 250 results in windows of 100; the short last window must ask for results 200-249."""
    monkeypatch.setenv("FLICKR_APIKEY", "k")
    engine = ENGINES["flickr"]
    cfg = CrawlConfig(keywords=["car"], engine=["flickr"], images_per_query=250, shard_size=100)
    units = plan_units(cfg)
    assert [(u.offset, u.count) for u in units] == [(0, 100), (100, 100), (200, 50)]
    fetched = []
    for u in units:
        feeder = engine.feeder(1, None, None)
        feeder.out_queue = queue.Queue()
        feeder.feed(**engine.feeder_kwargs(u, None, []))
        first = None
        while not feeder.out_queue.empty():
            q = dict(p.split("=", 1) for p in feeder.out_queue.get().split("?", 1)[1].split("&"))
            assert q["text"] == "car" and q["api_key"] == "k"
            page, per_page = int(q["page"]), int(q["per_page"])
            lo = (page - 1) * per_page  # the results this page holds: [lo, lo + per_page)
            first = lo if first is None else first
            fetched += range(lo, lo + per_page)
        # the unit keeps the first `count` results its pages give, in order: exactly its window
        assert first == u.offset
    kept = sorted({r for u in units for r in range(u.offset, u.offset + u.count)})
    assert kept == list(range(250)) and set(range(250)) <= set(fetched) and len(fetched) == len(set(fetched))


def test_an_engine_that_finds_nothing_for_every_query_is_warned_once(ray_local, tmp_path, caplog):
    """Issue #15 item 8, with the local engine: queries of classes it has no images of."""
    for i in range(2):
        (tmp_path / "world" / "cat").mkdir(parents=True, exist_ok=True)
        smooth_image(470 + i).save(tmp_path / "world" / "cat" / f"{i}.png")
    caplog.set_level(logging.WARNING, logger="maskless.ingest.crawl")
    cfg = fast_config(tmp_path, engine=["local"], keywords=["unicorn", "griffin"], local_root=str(tmp_path / "world"),
                      images_per_query=20, out=str(tmp_path / "none"))
    summary = run_crawl(cfg)
    warned = [r.getMessage() for r in caplog.records if "found no results" in r.getMessage()]
    assert warned == ["engine local found no results for any of its 2 queries; likely cause: "
                      + ENGINES["local"].no_results_hint] and summary["warnings"] == warned
    caplog.clear()
    found = run_crawl(fast_config(tmp_path, engine=["local"], keywords=["cat", "unicorn"],
                                  local_root=str(tmp_path / "world"), images_per_query=20, out=str(tmp_path / "some")))
    assert found["samples"] == 2 and found["warnings"] == [] and "found no results" not in caplog.text
    assert "icrawler issue #135" in ENGINES["google"].no_results_hint

"""The bench's markdown table and its PNG plot (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

from vlsearch.bench.video import markdown as video_markdown


def _f(x, nd: int = 1, unit: str = "") -> str:
    if x is None:
        return "n/a"
    if isinstance(x, str):
        return x
    if abs(x) >= 1000:
        return f"{x:,.0f}{unit}"
    if abs(x) >= 100:
        return f"{x:.0f}{unit}"
    return f"{x:.{nd}f}{unit}"


def _n(n: int) -> str:
    return (
        f"{n // 1_000_000}M"
        if n >= 1_000_000 and n % 1_000_000 == 0
        else (f"{n // 1000}k" if n % 1000 == 0 else str(n))
    )


def _precision(r: dict) -> str:
    return r["hardware"].get("precision", "bf16")


def markdown(r: dict) -> str:
    hw, meta = r["hardware"], r["meta"]
    out = []
    out.append(
        f"Machine: {hw['cpu']}, {hw['cores']} cores ({hw['torch_threads']} torch threads); measured "
        f"memory read {hw['memory']['read_gbs']:.1f} GB/s, matmul {hw['matmul_tflops_bf16']:.3g} TFLOP/s bf16 / "
        f"{hw['matmul_tflops_fp32']:.3g} TFLOP/s fp32; the models run in {_precision(r)} here, and the FLOP "
        f"floors use that rate. Load average at start {meta['load_average_start']}, "
        f"at end {meta.get('load_average_end')}; bench took {meta.get('seconds', 0) / 60:.1f} min."
    )
    if meta.get("background"):
        out.append(
            "Background load present during the run: "
            + "; ".join(f"{p['cmd'][:60]} ({p['cpu_percent']}% CPU)" for p in meta["background"][:4])
        )
    out.append("")
    out.append(f"### Encoding throughput ({_precision(r)}, both cores, side by side)")
    out.append("")
    out.append("| encoder | items/s | GFLOP/item | FLOP floor items/s | of floor | weights |")
    out.append("|---|---:|---:|---:|---:|---|")
    for row in r["encoders"]["rows"].values():
        if row.get("available") is False:
            out.append(f"| {row['name']} | not available | | | | {row['weights']} |")
            continue
        v = row.get("images_per_s", row.get("texts_per_s"))
        unit = "img/s" if "images_per_s" in row else "txt/s"
        floor = row.get("floor_images_per_s", row.get("floor_texts_per_s"))
        frac = row.get("fraction_of_floor")
        out.append(
            f"| {row['name']} | {_f(v)} {unit} | {_f(row.get('gflops_per_item'), 2)} | {_f(floor)} | "
            f"{_f(100 * frac, 0) + '%' if frac else 'n/a'} | {row['weights']} |"
        )
    ra = r["encoders"]["ratios"]
    out.append("")
    out.append(
        f"Ours / CLIP ViT-B/32: images {ra['image_ours_over_clip']:.2f}x, texts {ra['text_ours_over_clip']:.2f}x. "
        f"Tokenisation (ours, excluded above): {r['encoders']['tokenize_ms_per_text']:.3f} ms/text."
    )
    out.append("")
    out.append(
        f"### Pair scoring (one text x {r['pair_scoring']['k']} images per call, from cached image features)"
    )
    out.append("")
    out.append("| scorer | pairs/s | GFLOP/pair | FLOP floor pairs/s | of floor | weights |")
    out.append("|---|---:|---:|---:|---:|---|")
    for row in r["pair_scoring"]["rows"].values():
        if not row.get("available"):
            out.append(f"| {row['name']} | not available | | | | {row['weights']} |")
            continue
        frac = row.get("fraction_of_floor")
        out.append(
            f"| {row['name']} | {_f(row['pairs_per_s'])} | {_f(row['gflops_per_item'], 2)} | "
            f"{_f(row['floor_pairs_per_s'])} | {_f(100 * frac, 0) + '%' if frac else 'n/a'} | {row['weights']} |"
        )
    if r["pair_scoring"]["ratios"]:
        out.append("")
        out.append(
            "Ratios: "
            + ", ".join(f"{k.replace('_', ' ')} {v:.2f}x" for k, v in r["pair_scoring"]["ratios"].items())
        )
    out.append("")
    out.append("### Query latency, text in -> ids out (one query at a time)")
    out.append("")
    rec = {(x["n"], x["kind"]): x["recall_at_10_vs_exact"] for x in r["recall"]}
    out.append(
        "| gallery | index | pipeline | p50 ms | p99 ms | queries | floor ms | scan-all floor ms | recall@10 vs exact |"
    )
    out.append("|---:|---|---|---:|---:|---:|---:|---:|---:|")
    for row in r["latency"]:
        recall = rec.get((row["n"], row["kind"])) if row["pipeline"] == "fast" else None
        p50 = _f(row["p50_ms"]) + (" (extrapolated)" if row.get("extrapolated") else "")
        out.append(
            f"| {_n(row['n'])} | {row['kind']} | {row['pipeline']} | {p50} | {_f(row.get('p99_ms'))} | "
            f"{row.get('n_queries') or ''} | "
            f"{_f(row.get('floor_ms'), 2)} | {_f(row.get('scan_all_fp32_floor_ms'), 2)} | "
            f"{_f(recall, 3) if recall is not None else ''} |"
        )
    out.append("")
    out.append(
        f"floor: the query's text-encoder FLOPs at the measured {_precision(r)} rate + the bytes this index reads per query "
        "at the measured bandwidth (+ the Slow model's FLOPs and image tokens for K pairs). scan-all floor: "
        "streaming all N fp32 embeddings once."
    )
    qt = r.get("query_threads") or {}
    if qt:
        probe = ", ".join(f"{k} thread(s) {v:.1f} ms" for k, v in (qt.get("fast_probe_ms") or {}).items())
        line = (
            f"Torch threads per query, chosen by measurement: Fast {qt.get('fast')} (text encoding: {probe})"
        )
        if qt.get("fast+slow"):
            probe = ", ".join(
                f"{k} thread(s) {v:.1f} ms" for k, v in (qt.get("fast+slow_probe_ms") or {}).items()
            )
            line += f"; Fast+Slow {qt['fast+slow']} (K=50 query: {probe})"
        out.append("")
        out.append(line + ". Re-ranking starts from a cold per-image key/value memo on every query.")
    out.append("")
    out.append("### Index build and memory")
    out.append("")
    out.append("| gallery | index | build s | build s per 1M | index GB per 1M | bytes/image | parameters |")
    out.append("|---:|---|---:|---:|---:|---:|---|")
    for row in r["index"]:
        params = ", ".join(f"{k}={v}" for k, v in row["params"].items())
        out.append(
            f"| {_n(row['n'])} | {row['kind']} | {_f(row['build_s'], 2)} | {_f(row['build_s_per_million'])} | "
            f"{_f(row['index_gb_per_million'], 3)} | {_f(row['index_bytes_per_image'])} | {params} |"
        )
    g = r["galleries"][-1]
    out.append("")
    out.append(
        f"Gallery folder at {_n(g['n'])}: written in {g['write_s']:.1f} s ({g['write_s_per_million']:.0f} s per 1M: "
        f"SQLite metadata + fp16 embeddings + flat faiss); metadata {g['sqlite_bytes_per_image']:.0f} B/image in "
        f"SQLite, embeddings {g['embeddings_fp16_bytes_per_image']:.0f} B/image fp16 memory-mapped."
    )
    st = r["rerank_storage"]
    out.append("")
    out.append(
        f"Re-ranking storage: {st['bytes_per_image']:,} B/image ({st['what']}) = {st['gb_per_million']:.0f} GB per "
        f"1M images, memory-mapped (the full feature cache measured on disk: "
        f"{_f(st.get('cache_bytes_per_image_on_disk'))} B/image). {st['note']}"
    )
    e = r.get("embed_cost")
    if e:
        out.append("")
        out.append(
            f"Embedding a gallery: {e['images_per_s']:.0f} images/s -> {e['hours_per_million']:.2f} h per 1M images "
            f"on this machine (backbone on {e.get('runtime', 'torch')} + Fast image tower, decoded images; "
            "features then cached)."
        )
    sv = r.get("service") or {}
    out.append("")
    if "peak_rss_gb" in sv:
        out.append(
            f"Service memory ({sv['how']}; {_n(r['gallery_sizes'][-1])} gallery, {sv.get('kind')}): peak RSS "
            f"{sv['peak_rss_gb']:.2f} GB"
            + (
                f", idle {sv['idle_rss_gb']:.2f} GB after {sv['startup_s']:.1f} s start-up"
                if "idle_rss_gb" in sv
                else ""
            )
            + (f"; HTTP Fast p50 {sv['fast_http']['p50_ms']:.1f} ms" if sv.get("fast_http") else "")
            + (
                f", Fast+Slow(K={sv['rerank_K']}) p50 {sv['fast_slow_http']['p50_ms']:.1f} ms"
                if sv.get("fast_slow_http")
                else ""
            )
            + "."
        )
    b = r.get("billion_ivfpq")
    if b:
        out.append("")
        out.append(
            f"IVF-PQ at 1 billion images (EXTRAPOLATED from {b['measured_on']}): {b['ram_gb']:.0f} GB RAM "
            f"({b['ram_bytes_per_image']} B/image: PQ code + id; {b['nlist']:,} lists), "
            f"{b['fp16_recheck_vectors_gb_on_ssd']:.0f} GB fp16 vectors memory-mapped for the exact re-check "
            f"({b['recheck_reads_per_query']} rows/query); one query ~{b['query_p50_ms_estimate']:.0f} ms p50 "
            f"(text {b['text_encode_p50_ms']:.1f} + coarse {b['coarse_65536_flat_p50_ms']:.1f} + scan/re-check "
            f"{b['scan_and_recheck_p50_ms']:.1f} ms for {b['codes_scanned_per_query']:,.0f} codes), one thread."
        )
    dec = r.get("photos_decode")
    if dec:
        out.append("")
        out.append(
            f"### Indexing {dec['megapixels']:.0f}-megapixel JPEGs ({dec['images']} photos, end to end)"
        )
        out.append("")
        out.append("| path | images/s | decode ms/image (1 thread) | embedding cosine to full decode |")
        out.append("|---|---:|---:|---:|")
        if "filed_images_per_s" in dec:
            out.append(
                f"| as filed: {dec['filed']} | {_f(dec['filed_images_per_s'])} | {_f(dec['decode_full_ms'])} | 1 |"
            )
        out.append(f"| old: {dec['old']} | {_f(dec['old_images_per_s'])} | {_f(dec['decode_full_ms'])} | 1 |")
        out.append(
            f"| new: {dec['new']} | {_f(dec['new_images_per_s'])} | {_f(dec['decode_draft_ms'])} | "
            f"min {dec['cosine_min']:.4f}, mean {dec['cosine_mean']:.4f} |"
        )
    t = r["targets"]
    out.append("")
    out.append(f"### Targets at {_n(t['n'])} images")
    out.append("")
    for line in t["lines"]:
        out.append(f"- {line}")
    if r.get("video"):
        out.append(video_markdown(r["video"]))
    return "\n".join(out) + "\n"


def plot(r: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    # (a) encoders
    ax = axes[0, 0]
    enc = r["encoders"]["rows"]
    labels, vals, floors, colors = [], [], [], []
    for key, lab in (
        ("ours_image", "ours\nimage"),
        ("clip_image", "CLIP B/32\nimage"),
        ("ours_text", "ours\ntext"),
        ("clip_text", "CLIP B/32\ntext"),
    ):
        row = enc[key]
        labels.append(lab)
        vals.append(row.get("images_per_s", row.get("texts_per_s")))
        floors.append(row.get("floor_images_per_s", row.get("floor_texts_per_s")))
        colors.append("tab:blue" if key.startswith("ours") else "tab:gray")
    ax.bar(labels, vals, color=colors)
    ax.scatter(labels, floors, marker="_", s=400, color="black", label="FLOP floor")
    ax.set_yscale("log")
    ax.set_ylabel("items / s")
    ax.set_title(f"Encoding throughput ({_precision(r)}, 2 cores)")
    ax.legend(loc="upper left", fontsize=8)
    # (b) pair scoring
    ax = axes[0, 1]
    labels, vals, floors, colors = [], [], [], []
    for key, lab in (
        ("slow", "ours Slow"),
        ("deformer_joint", "ours deformer\n(joint)"),
        ("blip_itm", "BLIP-base\nITM"),
    ):
        row = r["pair_scoring"]["rows"].get(key, {})
        labels.append(lab + ("" if row.get("available") else "\n(n/a)"))
        vals.append(row.get("pairs_per_s") or 0)
        floors.append(row.get("floor_pairs_per_s") or 0)
        colors.append("tab:gray" if key == "blip_itm" else "tab:blue")
    ax.bar(labels, vals, color=colors)
    ax.scatter(labels, floors, marker="_", s=400, color="black", label="FLOP floor")
    ax.set_yscale("log")
    ax.set_ylabel("pairs / s")
    ax.set_title(f"Pair scoring (1 text x {r['pair_scoring']['k']} cached images)")
    ax.legend(loc="upper right", fontsize=8)
    # (c) latency
    ax = axes[1, 0]
    lat = r["latency"]
    styles = {"flat": "o-", "hnsw": "s-", "ivfflat": "^-", "ivfsq": "v-", "ivfpq": "d-"}
    for kind, st in styles.items():
        pts = [(x["n"], x["p50_ms"]) for x in lat if x["kind"] == kind and x["pipeline"] == "fast"]
        if pts:
            ax.plot(*zip(*pts, strict=True), st, label=f"Fast, {kind}")
        pts = [(x["n"], x["p50_ms"]) for x in lat if x["kind"] == kind and x["pipeline"] == "fast+slow K=50"]
        if pts:
            ax.plot(*zip(*pts, strict=True), st.replace("-", ":"), alpha=0.7, label=f"Fast+Slow K=50, {kind}")
    pts = [(x["n"], x["p50_ms"], x.get("extrapolated")) for x in lat if x["pipeline"] == "slow alone"]
    if pts:
        ax.plot(
            [p[0] for p in pts], [p[1] for p in pts], "k--", label="Slow alone (extrapolated past measured)"
        )
    floor = [
        (x["n"], x["scan_all_fp32_floor_ms"]) for x in lat if x["pipeline"] == "fast" and x["kind"] == "flat"
    ]
    if floor:
        ax.plot(*zip(*floor, strict=True), color="0.6", lw=1, label="floor: scan all fp32 embeddings")
    ax.axhline(15, color="tab:green", lw=0.8, ls="--")
    ax.axhline(100, color="tab:red", lw=0.8, ls="--")
    ax.text(min(r["gallery_sizes"]), 15, " 15 ms", va="bottom", fontsize=7, color="tab:green")
    ax.text(min(r["gallery_sizes"]), 100, " 100 ms", va="bottom", fontsize=7, color="tab:red")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("gallery images")
    ax.set_ylabel("p50 ms, text in -> ids out")
    ax.set_title("Query latency")
    ax.legend(fontsize=6.5, ncol=2, loc="upper left")
    # (d) memory per million and recall
    ax = axes[1, 1]
    nmax = r["gallery_sizes"][-1]
    rows = [x for x in r["index"] if x["n"] == nmax]
    rec = {x["kind"]: x["recall_at_10_vs_exact"] for x in r["recall"] if x["n"] == nmax}
    kinds = [x["kind"] for x in rows]
    gb = [x["index_gb_per_million"] for x in rows]
    bars = ax.bar(kinds, gb, color="tab:blue")
    for b, k, x in zip(bars, kinds, rows, strict=True):
        ax.text(
            b.get_x() + b.get_width() / 2,
            b.get_height(),
            f"R@10 {rec.get(k, float('nan')):.3f}\nbuild {x['build_s_per_million']:.0f} s/M",
            ha="center",
            va="bottom",
            fontsize=7,
        )
    ax.set_ylabel("index GB per million images (RAM)")
    ax.set_title(f"Index memory and recall@10 vs exact at {_n(nmax)}")
    ax.set_ylim(0, max(gb) * 1.35 if gb else 1)
    fig.suptitle(
        f"vlsearch bench{' --quick' if r['meta']['quick'] else ''}: {r['hardware']['cpu']}, {r['hardware']['cores']} cores",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path

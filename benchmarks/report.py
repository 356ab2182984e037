"""Renders benchmarks/results.json into the generated section of docs/performance.md.

Only the text between the two markers is replaced; everything around it is hand-written.
Run alone (no measuring): python -m benchmarks.report
"""

from __future__ import annotations

from benchmarks.common import DOC_PATH, fmt, load_results
from benchmarks.utilisation import AVERAGING_PARTS

BEGIN = "<!-- BEGIN GENERATED: benchmarks/run.py rewrites this section; edit the text around it -->"
END = "<!-- END GENERATED -->"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _mark(ok: bool | None) -> str:
    return "–" if ok is None else ("met" if ok else "**missed**")


def _pct(x: float | None) -> str:
    return "–" if x is None or x != x else f"{100 * x:.0f} %"


def _section(results: dict, name: str) -> tuple[dict | None, str]:
    entry = results.get("benchmarks", {}).get(name)
    if not entry:
        return None, f"_Not run yet: `python -m benchmarks.run --only {name}`._"
    if "error" in entry:
        return None, f"_Failed in the last run: {entry['error']}_"
    if "skipped" in entry["result"]:  # the section ran but had nothing to measure (no GPU, no fits)
        return None, f"_{entry['result']['skipped']}_"
    note = f"_{entry['seconds']:.0f} s, {entry['finished']}{', --quick' if entry.get('quick') else ''}._"
    return entry["result"], note


def machine(results: dict) -> str:
    m = results.get("machine", {})
    gpu = m.get("gpu") or "none"

    def run(r: dict) -> str:
        return (
            f"{r.get('finished')}, {', '.join(r.get('sections', []))}{' (--quick)' if r.get('quick') else ''}: "
            f"{r.get('total_s', 0) / 60:.1f} min, load average {r.get('load_average_at_start')} at the start and "
            f"{r.get('load_average_at_end')} at the end (other jobs share this machine)"
        )

    line = (
        f"Machine: {m.get('cores')} CPU cores ({m.get('cpu_model')}), {m.get('memory_gib')} GiB RAM, GPU: {gpu}; "
        f"Python {m.get('python')}, torch {m.get('torch')}, hivemind {m.get('hivemind')}, transformers {m.get('transformers')}."
    )
    full, last = results.get("last_full_run"), results.get("last_run")
    if full:
        line += f" Whole suite: {run(full)}."
    if last and last != full:
        line += f" Last partial run: {run(last)}."
    return line


def finetune(results: dict) -> str:
    r, note = _section(results, "finetune")
    if r is None:
        return note
    rows = []
    for row in r["rows"]:
        e, q = row["examples_per_s"], row["ratio"]
        rows.append(
            [
                row["model"],
                f"{row['body_params_m']} M",
                f"{row['steps']} × {row['batch']} × {row['max_length']}",
                row["repeats"],
                fmt(e["plain"], 1),
                fmt(e["p2pcold"], 1),
                f"**{fmt(q['p2pcold'], 3)}** ({fmt(row['ratio_range']['p2pcold'][0])}–{fmt(row['ratio_range']['p2pcold'][1])})",
                fmt(row["cpu_ratio"]["p2pcold"], 3),
                fmt(q["p2pcold+bar"], 3),
                fmt(row["cpu_ratio"]["p2pcold+bar"], 3),
            ]
        )
    out = [
        _table(
            ["body", "params", "steps × batch × tokens", "repeats", "plain ex/s", "p2pcold ex/s", "ratio, wall (min–max)", "ratio, CPU time", "ratio with progress bar", "…, CPU time"],
            rows,
        ),
        "",
        f"Target: ratio ≥ {r['target_ratio']} → {_mark(r['target_met'])}. Ratios are medians of per-repeat ratios "
        "(each repeat runs the variants back to back, rotating which goes first); ex/s are medians. torch on 1 thread.",
    ]
    if not r["target_met"] and all(v >= r["target_ratio"] for row in r["rows"] for v in row["cpu_ratio"].values()):
        out += [
            "",
            "The CPU-time ratios are all at target: p2pcold did the same work in the same CPU time, so the wall-clock gap "
            "is other jobs taking the core during some repeats. Rerun `python -m benchmarks.run --only finetune`.",
        ]
    t = r.get("threads_check")
    if t:
        out += [
            "",
            f"Threads check (plain loop, tiny encoder, {t['steps']} steps, interleaved): 1 thread {t['examples_per_s']['1']} ex/s "
            f"(min–max {t['min_max']['1'][0]}–{t['min_max']['1'][1]}), 2 threads {t['examples_per_s']['2']} ex/s "
            f"(min–max {t['min_max']['2'][0]}–{t['min_max']['2'][1]}).",
        ]
    if r.get("profile"):
        prof = r["profile"]
        out += [
            "",
            f"Profile (cProfile, tiny encoder, {prof['steps']} steps; total {fmt(prof['plain_s'])} s plain, "
            f"{fmt(prof['p2pcold_bar_s'])} s p2pcold with progress bar), p2pcold's top functions by own time:",
            "",
            "```",
            prof["p2pcold_bar"].strip(),
            "```",
        ]
    return "\n".join(out + ["", note])


def fusion(results: dict) -> str:
    r, note = _section(results, "fusion")
    if r is None:
        return note
    rows = []
    for row in r["rows"]:
        t, w, ph = row["time_s"], row["warmup_s"], row.get("phases_s", {})
        rows.append(
            [
                row["size"],
                f"{row['params'] / 1e6:.1f} M",
                row["peers"],
                row["repeats"],
                fmt(t.get("p2pcold-none")),
                fmt(t.get("bare")),
                fmt(t.get("gloo")),
                f"**{fmt(row['ratio_vs_bare'])}**",
                fmt(row["ratio_vs_gloo"], 1),
                f"{fmt(w.get('p2pcold-none'))} / {fmt(w.get('bare'))}",
                f"{fmt(ph.get('write_s'))} / {fmt(ph.get('read_s'))} / {fmt(ph.get('load_s'))} ({fmt(ph.get('lock_wait_s'))})",
            ]
        )
    out = [
        _table(
            ["body", "params", "peers", "timed rounds", "p2pcold boundary step (s)", "bare hivemind step (s)", "gloo all_reduce (s)", "p2pcold / bare", "p2pcold / gloo", "first round: p2pcold / bare (s)", "p2pcold copies: in / out / load (of which lock wait) (s)"],
            rows,
        ),
        "",
        f"Target: p2pcold / bare ≤ {r['target_ratio_vs_bare']} → {_mark(r['target_met'])}. Times: the slowest peer's, median over the timed rounds; "
        "ratios: median of per-round ratios (variants interleaved, rotating order). The first round (untimed warm-up) opens the connections.",
    ]
    for e in r.get("errors", []):
        out += ["", f"Not measured: {e['size']} × {e['peers']} peers: {e['error']}"]
    for row in r["rows"]:
        for f in row.get("failed_rounds", []):
            kind = "warm-up round" if f["round"] == 0 else f"timed round {f['round']}"
            out += ["", f"Failed and left out: {row['size']} × {row['peers']}, {f['variant']}, {kind}, on {f['peers_failed']} peer(s): {f['reason']}"]
    if r.get("copies"):
        out += [
            "",
            "p2pcold's own copies around the all-reduce, in one process on one thread (no network): the real "
            "`SharedTensors.write` + `read` (`swarm/body_tensors.py`, `BodyAverager`'s copies) + "
            "the finiteness check + `load_body_state`'s copy, against the same "
            "work in single passes (`torch.sub(body, θ0, out=shared)`, then `torch.add(shared, θ0, out=model)`):",
            "",
            _table(
                ["body", "params", "p2pcold today (s)", "single-pass (s)", "saving"],
                [
                    [c["size"], f"{c['params'] / 1e6:.1f} M", fmt(c["current_s"]), fmt(c["single_pass_s"]), _pct(1 - c["single_pass_s"] / c["current_s"])]
                    for c in r["copies"]
                ],
            ),
        ]
    compressed = [(row, name, c) for row in r["rows"] for name, c in row["compression"].items() if len(row["compression"]) > 1]
    if compressed:
        out += [
            "",
            "Compression (the p2pcold boundary step with wire compression; averaged body − θ0 deltas of N(0, "
            f"{r['delta_std']:g}²) per weight stand in for finetuning updates):",
            "",
            _table(
                ["body", "peers", "compression", "bytes per vector (MB)", "sent per peer per round (MB)", "measured I/O per peer, sent + received (MB)", "time (s)", "vs none", "max abs error", "mean abs error", "mean abs update"],
                [
                    [
                        row["size"],
                        row["peers"],
                        name,
                        fmt(c["bytes_per_vector"] / 1e6, 1),
                        fmt(c["sent_bytes_per_peer"] / 1e6, 1),
                        fmt(c["measured_io_bytes_per_peer"] / 1e6, 1) if c.get("measured_io_bytes_per_peer") else "–",
                        fmt(c["time_s"]),
                        fmt(c["ratio_vs_none"]),
                        f"{c['max_abs_error']:.2e}" if "max_abs_error" in c else "–",
                        f"{c['mean_abs_error']:.2e}" if "mean_abs_error" in c else "–",
                        f"{c['mean_abs_update']:.2e}" if "mean_abs_update" in c else "–",
                    ]
                    for row, name, c in compressed
                ],
            ),
            "",
            "Errors: |fused − `p2pcold.fusion.aggregate`| (the run's rule, computed in one process) over every value, after loading into the model. "
            "Bytes per vector: hivemind's serialized parts (512 KiB each) of the whole body; sent per peer = 2 (n−1)/n × that. "
            "Measured I/O: bytes through read/write syscalls of the peer's hivemind averager process (to and from its p2pd).",
        ]
    return "\n".join(out + ["", note])


UTILISATION_HEADER = [
    "iteration", "wall (s)", "training s: fast / slow", "examples: fast / slow", "training share: fast / slow", "waiting: fast / slow",
    "averaging", "dev eval + copies", "checkpoint", "other", "overhead s (all but training)",
]  # fmt: skip


def utilisation(results: dict) -> str:
    r, note = _section(results, "utilisation")
    if r is None:
        return note
    rows, splits = [], []

    def add(label: str, s: dict) -> None:
        split = s.get("averaging_split_s")
        if split:
            splits.append([label, *(fmt(split[part], 2) for part in AVERAGING_PARTS), fmt(sum(split.values()), 2)])
        rows.append(
            [
                label,
                fmt(s["iteration_s"], 1),
                f"{fmt(s['train_s_fast'], 1)} / {fmt(s['train_s_slow'], 1)}",
                f"{fmt(s['examples_fast'], 0)} / {fmt(s['examples_slow'], 0)}",
                f"**{_pct(s['train_fraction_fast'])}** / **{_pct(s['train_fraction_slow'])}**",
                f"{_pct(s['wait_fraction_fast'])} / {_pct(s['wait_fraction_slow'])}",
                _pct(s["averaging_fraction"]),
                _pct(s["eval_copy_fraction"]),
                _pct(s["checkpoint_fraction"]),
                _pct(s["other_fraction"]),
                fmt(s["overhead_s"], 1),
            ]
        )

    f = r["fixed_work"]
    add("(a) fixed work, uniform average", f)
    for seconds, s in r["time_budget"].items():
        add(f"(b) time budget {float(seconds):g} s, weighted by examples, boundary work in line", s)
    for seconds, s in r.get("time_budget_overlapped", {}).items():
        add(f"(b) time budget {float(seconds):g} s, weighted by examples, boundary work overlapped", s)
    m = r["model"]
    if "overlapped_overhead_s" not in m:  # a result from before issue 14
        return "\n".join([_table(UTILISATION_HEADER, rows), "", note])
    out = [
        _table(UTILISATION_HEADER, rows),
        "",
        "Shares are medians over peers (and over iterations); fast = the 3 normal peers, slow = the half-speed one. "
        "(a) leaves out iteration 0, which also opens the connections. Group sizes seen: "
        + ", ".join(str(g) for g in sorted({g for s in [f, *r["time_budget"].values()] for g in s["group_sizes"]}))
        + ". Overlapped: the dev evaluation runs during the all-reduce (its wait, if any, is in \"dev eval + copies\"), "
        "and the checkpoint is written during the next iteration's training (\"checkpoint\" is handing it to the writer).",
        "",
    ]
    if splits:
        out += [
            "Where the averaging phase goes (s, medians over peers; from the last arrival to the end of `fuse()`, "
            "the fusing attempt's times taken inside hivemind's averager process):",
            "",
            _table(["iteration", *AVERAGING_PARTS, "averaging"], splits),
            "",
        ]
    out += [
        "| boundary work | O: non-training s per iteration (by length) | training share at T = 120 s | at 600 s | 97 % from T = |",
        "|---|---|---|---|---|",
    ]
    for label, key in (("in line (before)", ""), ("overlapped (after, the default)", "overlapped_")):
        by_length = ", ".join(f"{fmt(v, 1)} at {float(k):g} s" for k, v in m[f"{key}overhead_s_by_length"].items())
        out.append(
            f"| {label} | {fmt(m[f'{key}overhead_s'], 1)} ({by_length}) | **{_pct(m[f'{key}time_budget_at_120s'])}** | "
            f"{_pct(m[f'{key}time_budget_at_600s'])} | {fmt(m[f'{key}time_budget_length_for_97pct_s'], 0)} s |"
        )
    out += [
        "",
        "Model: utilisation(T) = T / (T + O), O measured at two lengths in the same run, both orders interleaved. "
        f"Fixed work with a 2× slower peer (in line): fast peers {_pct(m['fixed_work_fast_at_120s'])}, slow peer "
        f"{_pct(m['fixed_work_slow_at_120s'])} at 120 s of fast-peer work (≤ 50 % for the fast peers at any length). "
        f"Target ≥ {_pct(r['target_fraction'])} at 2-minute iterations → {_mark(m['target_met_at_120s'])} "
        "(training share, time budget, overlapped, extrapolated).",
    ]
    if "overlapped_allreduce_s" in m:
        out[-1] += (
            f" 97 % at 120 s leaves O ≤ {fmt(m['overhead_s_for_97pct_at_120s'], 1)} s; the all-reduce alone takes "
            f"{fmt(m['overlapped_allreduce_s'], 1)} s here (4 peers on 2 cores), which by itself caps the share at "
            f"{_pct(m['allreduce_alone_at_120s'])}."
        )
    return "\n".join(out + ["", note])


def memory(results: dict) -> str:
    r, note = _section(results, "memory")
    if r is None:
        return note
    rows = [[row["what"], fmt(row["peak_rss_mib"], 0), fmt(row["tree_pss_mib"], 0)] for row in r["cpu"]]
    out = [_table(["process (CPU)", "peak RSS of the peer process (MiB)", "PSS of its process tree, incl. hivemind (MiB)"], rows), ""]
    out += ["GPU rows (peak CUDA memory, AdamW vs AdamW8bit): section 6."]
    return "\n".join(out + ["", note])


def _gpu_finetune(g: dict) -> list[str]:
    before = {row["variant"]: row for row in g.get("companions", {}).get("before-change", {}).get("finetune", [])}
    rows = []
    for row in g["finetune"]:
        shape = f"{row['batch']} × {row['max_length']}" + (f" × {row['gradient_accumulation']}" if row.get("gradient_accumulation", 1) > 1 else "")
        if "error" in row:
            rows.append([row["variant"], row["data"], shape, row["error"]] + ["–"] * 7)
            continue
        old = before.get(row["variant"], {})
        ratio = row["examples_per_s"] / old["examples_per_s"] if old.get("examples_per_s") else None
        rows.append(
            [
                row["variant"], row["data"], shape, row["steps"], fmt(row["examples_per_s"], 0), fmt(row["model_tflops"], 1),
                f"**{_pct(row['mfu'])}**" if row["precision"] == "bf16" else _pct(row["mfu"]), _pct(row["mfu_datasheet"]),
                fmt(row["peak_cuda_mib"], 0), fmt(old.get("examples_per_s"), 0), fmt(ratio, 2),
            ]
        )
    header = ["variant", "data", "batch × tokens (× accumulation)", "steps", "ex/s", "model TFLOP/s", "MFU (measured peak)",
              "MFU (datasheet)", "peak CUDA memory (MiB)", "ex/s before this change", "after / before"]
    bf16 = [row for row in g["finetune"] if row["precision"] == "bf16" and "mfu" in row]
    best = max(bf16, key=lambda row: row["mfu"]) if bf16 else None
    target = (
        f"Target: MFU ≥ 40 % in bf16 → {_mark(best['mfu'] >= 0.40)} (best: {_pct(best['mfu'])}, {best['variant']})."
        if best else "Target: MFU ≥ 40 % in bf16 → –."
    )
    return [_table(header, rows), "", target]


def _gpu_loader(g: dict) -> list[str]:
    runs = {name: g.get("companions", {}).get(f"loader-workers-{name}") for name in ("2", "0")}
    if not all(runs.values()):
        return []
    zero = {row["variant"]: row for row in runs["0"]["finetune"]}
    rows = [
        [row["variant"], row["steps"], fmt(row.get("examples_per_s"), 0), fmt(zero.get(row["variant"], {}).get("examples_per_s"), 0),
         fmt(row["examples_per_s"] / zero[row["variant"]]["examples_per_s"], 2) if row.get("examples_per_s") and zero.get(row["variant"], {}).get("examples_per_s") else "–"]
        for row in runs["2"]["finetune"]
    ]
    return [
        f"Loader lever, longer timed runs (up to one epoch, ≤ 120 steps; `{runs['2']['source']}`, `{runs['0']['source']}`, one call, workers 2 first):",
        "",
        _table(["variant", "steps", "ex/s, 2 loader workers (p2pcold on CUDA)", "ex/s, loader in the main process", "ratio"], rows),
    ]


def _gpu_optimizer(g: dict) -> list[str]:
    adamw = {row["precision"]: row.get("optimizer_state_mib") for row in g["optimizer"] if row["optimizer"] == "adamw"}
    rows, ratios = [], []
    for row in g["optimizer"]:
        if "error" in row:
            rows.append([row["optimizer"], row["precision"], row["error"], "–", "–", "–"])
            continue
        ratio = row["optimizer_state_mib"] / adamw[row["precision"]] if adamw.get(row["precision"]) else None
        if row["optimizer"] == "adamw8bit":
            ratios.append(ratio)
        rows.append([row["optimizer"], row["precision"], fmt(row["optimizer_state_mib"], 1), _pct(ratio), fmt(row["peak_cuda_mib"], 0), fmt(row["examples_per_s"], 0)])
    header = ["optimizer", "precision", "optimizer state (MiB)", "vs AdamW", "peak CUDA memory in finetune() (MiB)", "ex/s"]
    target = f"Target: AdamW8bit state ≤ 30 % of AdamW's → {_mark(max(ratios) <= 0.30) if ratios and None not in ratios else '–'}."
    return [_table(header, rows), "", target]


def _gpu_simulate(g: dict) -> list[str]:
    s = g.get("simulate")
    if not s:
        return []
    if s.get("exit_code") != 0:
        return [f"`p2pcold simulate` on the card failed: {s.get('error') or 'exit code ' + str(s.get('exit_code'))}."]
    rows = [[
        s["peers"], s["precision"], f"{s['iterations']} × {s['steps']} steps × {s['batch']}", fmt(s["iteration_s_median"], 1),
        ", ".join(fmt(x, 0) for x in s["iteration_s"]), fmt(s["finetune_examples_per_s_median"], 0), fmt(s["wall_s"], 0),
        fmt(s["peak_gpu_used_mib"], 0), ", ".join(str(x) for x in s["peak_gpu_per_process_mib"]),
    ]]
    header = ["peers", "precision", "iterations × budget × batch", "s per iteration (median)", "each peer's iterations (s)",
              "finetune ex/s per peer (median)", "wall incl. start (s)", "peak card memory (MiB)", "peak per process (MiB)"]
    command = ["p2pcold", "simulate", "CONFIG"] + s["command"].split()[3:]  # the config was a temporary file
    return [f"`{' '.join(command)}` (Rotten Tomatoes in {s['peers']} shards, RoBERTa-base-size body, no evaluation):", "", _table(header, rows)]


def gpu(results: dict) -> str:
    g, note = _section(results, "gpu")
    if g is None:
        return note
    ceilings = [[kind, fmt(g["measured_tflops"][kind], 1), fmt(g["datasheet_tflops"][kind], 1)] for kind in ("bf16", "tf32", "fp32")]
    out = [
        f"Card: {g['device']} ({g['device_memory_gib']} GiB), torch {g['torch']}, transformers {g['transformers']}; measured "
        f"{g['started']} – {g.get('finished', '?')} (`{g['source']}`). RoBERTa-base-size body "
        f"({fmt(g['optimizer'][0].get('params', float('nan')) / 1e6, 1)} M parameters with the head, random weights), "
        "`p2pcold.finetune.finetune()`, AdamW unless said otherwise.",
        "",
        _table(["8192³ matrix product", "measured TFLOP/s (random data)", "datasheet, dense (TFLOP/s)"], ceilings),
        "",
    ]
    out += _gpu_finetune(g)
    before = g.get("companions", {}).get("before-change")
    if before:
        out += ["", f"Before this change: the previous `finetune.py` and `data/prepare.py`, measured in the same call (`{before['source']}`)."]
    out += [""] + _gpu_loader(g) + [""] + _gpu_optimizer(g) + [""] + _gpu_simulate(g)
    return "\n".join(out + ["", note])


def scaling(results: dict) -> str:
    r, note = _section(results, "scaling")
    if r is None:
        return note
    fit = r["fits"].get("p2pcold-none")
    if not fit:
        return "_No fit._"
    out = [
        f"Fit to the measured p2pcold boundary steps (loopback, all peers on 2 cores): t = a + n·B / (2 c), "
        f"a = {fmt(fit['latency_s'])} s, c = {fmt(fit['core_bytes_per_s'] / 1e6, 0)} MB/s per core "
        f"(plain t = a + B / thr: a = {fmt(fit['plain_latency_s'])} s, thr = {fmt(fit['plain_bytes_per_s'] / 1e6, 0)} MB/s).",
        "",
        _table(
            ["body", "peers", "sent per peer (MB)", "measured (s)", "CPU-shared model (s)", "plain model (s)"],
            [[c["size"], c["peers"], fmt(c["sent_mb"], 0), fmt(c["measured_s"]), fmt(c["cpu_model_s"]), fmt(c["plain_model_s"])] for c in fit["checks"]],
        ),
    ]
    for name in ("bare", "gloo"):
        other = r["fits"].get(name)
        if other:
            out += ["", f"Same fit for {name}: a = {fmt(other['latency_s'])} s, c = {fmt(other['core_bytes_per_s'] / 1e6, 0)} MB/s per core."]
    links = r["links"]
    proj = [row for row in r["projection"] if row["compression"] in ("none", "8bit")]
    out += [
        "",
        "Projection to volunteer swarms, each peer on its own machine and link. Flat: one all-reduce of all P peers "
        "(a peer sends and receives 2 (P−1)/P × payload; t = a + B / min(link, c)). Moshpit: p2pcold's rounds "
        "(`target_group_size` = g < P), d rounds in groups of g (2 (g−1)/g × payload per round; "
        "t = d × (a + B / min(link, c))), with g = ⌈√P⌉ (2 rounds) and with g = 4. a and c from the fit above.",
        "",
        _table(
            ["peers", "body", "compression", "flat: MB per peer"]
            + [f"flat at {l} (s)" for l in links]
            + ["g × d", "Moshpit: MB per peer per round"]
            + [f"Moshpit at {l} (s)" for l in links]
            + ["g = 4: d"]
            + [f"g = 4 at {l} (s)" for l in links],
            [
                [row["peers"], row["size"], row["compression"], fmt(row["flat_mb"], 0)]
                + [fmt(row["flat"][l], 1) for l in links]
                + [f"{row['group']} × {row['rounds']}", fmt(row["mb_per_round"], 0)]
                + [fmt(row["moshpit"][l], 1) for l in links]
                + [row.get("small_rounds", "–")]
                + [fmt(row["moshpit_small"][l], 1) if "moshpit_small" in row else "–" for l in links]
                for row in proj
            ],
        ),
    ]
    return "\n".join(out + ["", note])


def robust(results: dict) -> str:
    r, note = _section(results, "robust")
    if r is None:
        return note

    def error(v: dict) -> str:
        if v["max_error"] is None:
            return f"no fusion ({v['status']})"
        return f"{v['max_error']:.3g} / {v['rms_error']:.3g}"

    out = [
        f"{r['peers']} members on 127.0.0.1, {r['rogues']} of them rogue, a body shaped like the tiny test encoder; "
        "distance of an honest member's fused body to the honest-only average (max / RMS over every value). "
        "robust: `aggregation` defaults (trimmed mean); mean: `rule: mean` (weights capped at 4 × the median); "
        "plain: the mean with weights as declared, as hivemind's own reducer computes it (NaN is still left out). "
        "With NaN left out, 7 honest members remain: the mean variants give exactly their average, the robust one "
        "their trimmed mean, within their own spread.",
        "",
        _table(
            ["rogue sends", "robust", "mean (capped weights)", "plain mean", "honest members' own spread (max)"],
            [[a["attack"], error(a["robust"]), error(a["mean"]), error(a["plain"]), f"{a['honest_spread']:.3g}"] for a in r["attacks"]],
        ),
        "",
        "Cost: the slowest member's fusion time of all-honest rounds, robust vs mean, interleaved in the same swarm "
        "(both through p2pcold's reducer; median over rounds, ratio: median of per-round ratios).",
        "",
        _table(
            ["body", "params", "timed rounds", "robust (s)", "mean (s)", "robust / mean"],
            [[t["size"], f"{t['params']:,}", t["repeats"], fmt(t["robust_s"]), fmt(t["mean_s"]), f"**{fmt(t['ratio'])}**"] for t in r["timing"]],
        ),
    ]
    return "\n".join(out + ["", note, "", robust_accuracy(results)])


def robust_accuracy(results: dict) -> str:
    r, note = _section(results, "robust_accuracy")
    if r is None:
        return f"MiniLM accuracy with 1 rogue: {note}"
    columns = list(r["rows"][0]["scores"])
    honest = next(row["mean"] for row in r["rows"] if row["variant"] == "honest only, mean")
    header = ["fused base"] + [f"{c} ({r['targets'][c.split()[0]]})" for c in columns] + ["mean", "vs honest-only mean (points)", "max |base − honest mean|"]
    rows = [
        [row["variant"]] + [f"{row['scores'][c]:.4f}" for c in columns]
        + [f"{row['mean']:.4f}", f"{100 * (row['mean'] - honest):+.2f}", f"{row['distance']:.3g}"]
        for row in r["rows"]
    ]
    verdict = "met" if r["met"] else "missed"
    return "\n".join(
        [
            f"MiniLM on the offline data (`benchmarks/robust_accuracy.py`): one boundary of the demo's run with "
            f"{len(r['contributors'])} honest contributors ({', '.join(r['contributors'])}) and one rogue contribution "
            f"made from θ0; every fused base gets the demo's evaluation ({', '.join(r['modes'])}, {r['few_shot']} "
            "examples per target). Fusion is `fusion.aggregate`, what every reducer of the all-reduce computes.",
            "",
            _table(header, rows),
            "",
            f"Target: with 1 rogue, robust fusion within 1 point of honest-only fusion (the paper's mean) → {verdict} "
            f"(worst: {-r['worst_drop_points']:+.2f} points).",
            "",
            note,
        ]
    )


def generated(results: dict) -> str:
    parts = [
        machine(results),
        "### 1. Finetune throughput",
        finetune(results),
        "### 2. Fusion round",
        fusion(results),
        "### 3. Utilisation",
        utilisation(results),
        "### 4. Memory",
        memory(results),
        "### 5. Scaling",
        scaling(results),
        "### 6. GPU",
        gpu(results),
        "### 7. Robust fusion",
        robust(results),
    ]
    return "\n\n".join(parts)


TEMPLATE = f"""# Performance

Measured by `make bench` (`python -m benchmarks.run`); the section between the markers is
regenerated from `benchmarks/results.json` on every run.

{BEGIN}
{END}
"""


def write_docs(results: dict) -> None:
    text = DOC_PATH.read_text() if DOC_PATH.is_file() else TEMPLATE
    if BEGIN not in text or END not in text:
        text = text.rstrip() + "\n\n" + BEGIN + "\n" + END + "\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOC_PATH.write_text(head + BEGIN + "\n\n" + generated(results) + "\n\n" + END + tail)


if __name__ == "__main__":
    write_docs(load_results())
    print(f"wrote {DOC_PATH}")

"""The readable table printed after a benchmark run (the JSON has everything)."""

from __future__ import annotations

from mmsep.runtime.requests import TIMING_KEYS


def _ms(value: float) -> str:
    return f"{value * 1000:9.1f}"


def _x(value) -> str:
    return "      -" if value is None else f"{value:6.2f}x"


def table(report: dict) -> str:
    m, s = report["model"], report["settings"]
    machine = report["machine"]
    lines = [f"mmsep benchmark: {m['preset']} ({m['dir']}), steps {s['steps']}, cfg {s['cfg']}, "
             f"{s['repeats']} runs after {s['warmup']} warm-up, {s['threads']} threads, "
             f"video {s['video_size'] or 'none'}",
             f"machine: {machine['cpu']} ({machine['cores']} cores)"
             + (f", {machine['gpu']} (driver {machine['driver']})" if machine["gpu"] else "")]
    for row in report["results"]:
        c, b = row["candidate"], row["baseline"]
        lines += ["", f"{row['backend']} ({c['precision']}) vs baseline torch "
                      f"({b['precision']}): {row['duration']:g} s x batch {row['batch']} = "
                      f"{row['audio_seconds']:g} s of audio, {row['windows']} window(s)",
                  f"  {'stage':<13}{'base med ms':>12}{'base p90':>10}{'cand med ms':>12}"
                  f"{'cand p90':>10}{'speed-up':>10}"]
        for key in (*TIMING_KEYS, "end_to_end"):
            bs = b["stages"][key] if key in b["stages"] else b["end_to_end"]
            cs = c["stages"][key] if key in c["stages"] else c["end_to_end"]
            lines.append(f"  {key:<13}{_ms(bs['median']):>12}{_ms(bs['p90']):>10}"
                         f"{_ms(cs['median']):>12}{_ms(cs['p90']):>10}   "
                         f"{_x(row['speedup'][key])}")
        for name, r in (("baseline", b), ("candidate", c)):
            gpu = "-" if r["peak_gpu_mb"] is None else f"{r['peak_gpu_mb']:.0f} MiB"
            eff = r["denoiser"]
            ratio = "-" if eff["ratio_to_floor"] is None else f"{eff['ratio_to_floor']:.1f}x floor"
            lines.append(f"  {name:<10} RTF {r['rtf']:.3f}, {r['throughput']:.2f} s audio/s, "
                         f"peak RSS {r['peak_rss_mb']:.0f} MiB, GPU {gpu}; denoiser "
                         f"{eff['tflops']:.3f} TFLOP/s ({ratio})")
    for backend, micro in report["clip_image"].items():
        lines.append("")
        lines.append(f"clip_image, one window ({micro['frames']} frames), {backend}: baseline "
                     f"{_ms(micro['baseline']['median']).strip()} ms "
                     f"({micro['baseline']['tflops']:.3f} TFLOP/s), candidate "
                     f"{_ms(micro['candidate']['median']).strip()} ms "
                     f"({micro['candidate']['tflops']:.3f} TFLOP/s), "
                     f"{_x(micro['speedup']).strip()}")
    for skipped in report["skipped"]:
        lines.append(f"skipped backend {skipped['backend']}: {skipped['reason']}")
    return "\n".join(lines)

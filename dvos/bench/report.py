"""The printed report of `dvos bench`: one table per section, each saying how it was measured."""

from __future__ import annotations

from typing import Any

from dvos.bench.sizes import size_lines

MB = 2**20


def _num(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:.0f}"
    return f"{value:.{digits}g}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = [
        "  ".join(
            f"{cell:<{w}}" if i == 0 else f"{cell:>{w}}" for i, (cell, w) in enumerate(zip(header, widths))
        )
    ]
    for row in rows:
        lines.append(
            "  ".join(
                f"{cell:<{w}}" if i == 0 else f"{cell:>{w}}" for i, (cell, w) in enumerate(zip(row, widths))
            )
        )
    return lines


def _memory_rows(rows: list[dict[str, Any]], *, with_window: bool) -> list[list[str]]:
    out = []
    for row in rows:
        line = [row["model"], str(row["length"]), _num(row.get("fps")), _num(row.get("seconds_per_frame"))]
        if with_window:
            line.append(f"{row['first_timed_frame']}..{row['length'] - 1}")
        line += [
            str(row.get("memory_frames", "-")),
            f"{row['state_bytes'] / MB:.2f}",
            f"{row['peak_mb']:.0f}",
            f"{row['growth_mb']:+.1f}",
        ]
        out.append(line)
    return out


def _memory_section(
    heading: list[str], block: dict[str, Any], summary: dict[str, Any], *, with_window: bool, growth_key: str
) -> list[str]:
    """A section of timed walks (the inference cells with their timed window, or the memory walk):
    `heading` lines, peak-memory method, the table, the failures and the change with length."""
    lines = ["", *heading, f"  peak memory: {block['memory_method']}; {block['isolation']}"]
    header = ["model", "L", "FPS", "s/frame", *(["timed"] if with_window else [])]
    header += ["mem frames", "state MB", "peak MB", "growth MB"]
    lines += ["  " + line for line in _table(header, _memory_rows(block["rows"], with_window=with_window))]
    for error in block.get("errors", []):
        where = f" at L={error['length']}" if with_window else ""
        lines.append(f"  {error['model']}{where}: FAILED ({error['error']})")
    growth = _growth_line(summary, growth_key)
    if growth:
        lines.append(f"  {growth}")
    return lines


def _growth_line(summary: dict[str, Any], key: str) -> str | None:
    growth = summary.get(key)
    if not growth:
        return None
    parts = []
    for model, change in growth.items():
        parts.append(
            f"{model} {change['state_bytes_change'] / MB:+.2f} MB state, "
            f"{change['growth_mb_change']:+.1f} MB peak growth"
        )
    first = next(iter(growth.values()))
    return f"change from L={first['from_length']} to L={first['to_length']}: " + "; ".join(parts)


def _teachers_section(block: dict[str, Any] | None) -> list[str]:
    """The student against every teacher: FPS, memory, size, FLOPs and the FPS ratio."""
    if not block:
        return []
    size = block["size"]
    lines = [
        "",
        f"The student against the teachers at {size[0]}×{size[1]}, {block['length']}-frame video",
        f"  how: {block['measured']}; {block['weights']}",
    ]
    rows = []
    for row in block["rows"]:
        if row.get("error"):
            rows.append([row["model"], "FAILED", "-", "-", "-", "-", "-", "-"])
            continue
        rows.append(
            [
                row["model"] + ("" if row["size"] == size else f" ({row['size'][0]}×{row['size'][1]})"),
                _num(row["fps"]),
                f"{row['peak_mb']:.0f}",
                f"{row['state_mb']:.1f}",
                "-" if row["parameters"] is None else f"{row['parameters'] / 1e6:.1f}",
                _num(row["gflops_per_frame"]),
                "-" if row["student_fps_over_this"] is None else f"{row['student_fps_over_this']:.2f}×",
                row["title"],
            ]
        )
    header = ["model", "FPS", "peak MB", "state MB", "M params", "GFLOP/frame", "student ×", "what"]
    lines += ["  " + line for line in _table(header, rows)]
    for row in block["rows"]:
        if row.get("error") or row.get("note"):
            lines.append(f"  {row['model']}: {row.get('error') or row.get('note')}")
    return lines


def format_report(results: dict[str, Any]) -> str:
    """The whole report as text (what `dvos bench` prints)."""
    lines: list[str] = []
    machine = results.get("machine", {})
    load = ""
    if machine.get("load_average_start"):
        load = f", load average {machine['load_average_start'][0]:.1f}"
        if machine.get("load_average_end"):
            load += f" → {machine['load_average_end'][0]:.1f}"
    device = machine.get("cuda") or machine.get("device")
    lines.append(
        f"dvos bench — {device}, {machine.get('threads')} torch threads, {machine.get('cpu_count')} CPUs{load}; "
        f"{results.get('seconds', 0):.0f} s"
    )
    lines.append(f"student: {results['student']['weights']}")
    lines.append(f"teacher: {results['teacher']['weights']}")
    lines.append(f"dense:   {results['dense']['description']}")
    matmul = results.get("matmul", {})
    summary = results.get("summary", {})
    if matmul.get("start"):
        start, end = matmul["start"], matmul.get("end")
        lines.append(
            f"matmul:  {summary.get('matmul_gflops', start['gflops']):.1f} GFLOP/s ({start['dtype']} {start['size']}³, "
            f"best of {start['repeats']}; {start['gflops']:.1f} at the start, {end['gflops']:.1f} at the end)"
            if end
            else f"matmul:  {start['gflops']:.1f} GFLOP/s ({start['dtype']} {start['size']}³)"
        )

    inference = results.get("inference")
    if inference:
        size = inference["size"]
        heading = [
            f"Inference at {size[0]}×{size[1]} ({inference['video']})",
            f"  how: {inference['measured']}",
        ]
        lines += _memory_section(
            heading, inference, summary, with_window=True, growth_key="memory_growth_inference"
        )

    lines += _teachers_section(results.get("teachers"))

    flops = results.get("flops")
    if flops and flops.get("student"):
        student = flops["student"]
        modules = ", ".join(f"{name} {value:.2f}" for name, value in student["by_module_gflops"].items())
        lines += [
            "",
            f"FLOPs per frame at {flops['size'][0]}×{flops['size'][1]} ({flops['counter']}: matmul/conv/attention)",
        ]
        lines.append(
            f"  student: {student['gflops_per_frame']:.2f} GFLOP ({modules}); {student['parameters'] / 1e6:.2f} M parameters"
        )
        if "student_share_of_matmul" in summary:
            lines.append(
                f"  at {summary['student_fps']:.3g} FPS the student computes {summary['student_achieved_gflops']:.1f} GFLOP/s = "
                f"{100 * summary['student_share_of_matmul']:.1f} % of this machine's matmul rate"
            )
        if flops.get("teacher"):
            teacher = flops["teacher"]
            lines.append(
                f"  teacher: {teacher['gflops_per_frame']:.2f} GFLOP (context of {teacher['context_frames']} frames; "
                f"top-k and softmax not counted)"
            )
        dense = flops.get("dense_read")
        if dense:
            by_length = ", ".join(f"L={k}: {_num(v)}" for k, v in dense["gflops_by_length"].items())
            lines.append(f"  dense memory read ({dense['formula']}): {by_length} GFLOP per frame")

    lines += size_lines(results.get("sizes"))

    attention = results.get("attention")
    if attention:
        lines += [
            "",
            "The student's attention at inference, whole map against row blocks",
            f"  how: {attention['measured']}",
        ]
        rows = [
            [
                f"{row['size'][0]}×{row['size'][1]} {row['attention']}",
                f"{row['queries']} × {row['keys']}",
                f"{row['map_mb']:.0f}",
                _num(row["whole_ms"]),
                _num(row["blocked_ms"]),
                f"{row['speedup']:.2f}×" if row.get("speedup") else "-",
                f"{row['whole_peak_mb']:.0f}",
                f"{row['blocked_peak_mb']:.0f}",
                f"{row['max_abs_difference']:.1e}",
            ]
            for row in attention["rows"]
        ]
        header = ["frame, attention", "N × M", "map MB", "whole ms", "blocks ms", "speed-up"]
        header += ["whole peak MB", "blocks peak MB", "max |diff|"]
        lines += ["  " + line for line in _table(header, rows)]

    stream = results.get("stream")
    if stream:
        size = stream["size"]
        heading = [f"Memory walk at {size[0]}×{size[1]}: {stream['measured']}"]
        lines += _memory_section(
            heading, stream, summary, with_window=False, growth_key="memory_growth_stream"
        )

    loading = results.get("data_loading")
    if loading:
        clip = loading["clip"]
        lines += [
            "",
            f"Data loading: clips of {clip['clip_len']} frames, {clip['crop_size'][0]}×{clip['crop_size'][1]} crops "
            f"with the configured augmentation, batch {clip['batch_size']}",
        ]
        rows = []
        for key, label in (("mp4", "mp4 (decord)"), ("frames", "JPEG frame folders")):
            entry = loading.get(key) or {}
            for mode in ("single", "loader"):
                if entry.get(mode):
                    value = entry[mode]
                    rows.append(
                        [label, str(value["num_workers"]), str(value["videos"]), _num(value["clips_per_s"])]
                    )
        step = loading.get("train_step")
        if step:
            rows.append(["training step consumes", "-", "-", _num(step["clips_per_s"])])
        lines += ["  " + line for line in _table(["source", "workers", "videos", "clips/s"], rows)]
        if step:
            lines.append(
                f"  training step: {step['what']}, {step['seconds_per_step']:.2f} s per batch of {step['batch_size']}"
            )
            for name, part in (step.get("parts") or {}).items():
                share = "-" if part["share"] is None else f"{100 * part['share']:.1f} %"
                lines.append(
                    f"  of which {name}: {part['seconds_per_step']:.3f} s per step ({share}; "
                    f"{(step.get('parts_what') or {}).get(name, '')})"
                )
        if loading.get("verdict"):
            lines.append(f"  {loading['verdict']}")

    accuracy = results.get("accuracy")
    if accuracy:
        lines += ["", "J&F against FPS", f"  how: {accuracy['measured']}"]
        rows = []
        for dataset in accuracy["datasets"]:
            if dataset.get("note"):
                lines.append(f"  {dataset['name']}: {dataset['note']}")
                continue
            where = f"{len(dataset['sequences'])} seq, {dataset['frames']} frames"
            if dataset.get("max_size"):
                where += f", long side ≤ {dataset['max_size']}"
            for row in dataset["rows"]:
                rows.append(
                    [
                        f"{dataset['name']} ({where})",
                        row["model"],
                        _num(row["J&F"]),
                        _num(row["J"]),
                        _num(row["F"]),
                        _num(row["fps"]),
                    ]
                )
        if rows:
            lines += ["  " + line for line in _table(["set", "model", "J&F", "J", "F", "FPS"], rows)]

    export = results.get("export")
    if export:
        files = ", ".join(f"{name}: {path}" for name, path in export["files"].items()) or "none"
        lines += ["", f"Exported student ({export['runtime']}): {files}"]
        for note in export.get("notes", []):
            lines.append(f"  {note}")
        quantization = export.get("quantization")
        if quantization:
            lines.append(
                f"  int8: {quantization['method']}; weights {quantization['weights']}, activations "
                f"{quantization['activations']}; {quantization['calibration_frames']} calibration frames of "
                f"{quantization['calibration_source']}"
            )
        int8 = (results.get("summary") or {}).get("int8_student")
        if int8:
            line = (
                f"  int8 student: {_num(int8['fps'])} FPS (fp32 ONNX {_num(int8['fps_fp32_onnx'])}, "
                f"PyTorch {_num(int8['fps_pytorch'])}; L={int8['length']})"
            )
            if "jf" in int8:
                delta = "-" if int8["jf_delta"] is None else f"{int8['jf_delta']:+.4f}"
                line += (
                    f"; J&F on {int8['jf_set']} {_num(int8['jf'])} against {_num(int8['jf_fp32_onnx'])} "
                    f"in fp32 (Δ {delta}; PyTorch {_num(int8['jf_pytorch'])})"
                )
            lines.append(line)

    for name, error in (results.get("errors") or {}).items():
        lines.append(f"section {name} FAILED: {error}")
    for note in results.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)

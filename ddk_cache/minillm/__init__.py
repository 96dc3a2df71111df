"""MiniLLM (Gu et al. 2023) as offline rounds: the student answers prompts, the teacher scores them, the student learns.

`prompts` (the prompt manifest), `rollouts` / `vllm_rollouts` (the student's sampled answers, HF or vLLM),
`rollout_store` (written for the teacher to score), `objective` (reverse KL on the student's own samples),
`pretraining_data` (the language-modelling term), `response_quality` (ROUGE-L and the teacher's judgement).
"""

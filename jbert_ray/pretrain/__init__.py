"""`jbert pretrain`: masked-LM pretraining on Ray Train, in reading order:

config.py (PretrainConfig, WorkerConfig) → checks.py (before Ray starts) → driver.py (run_pretraining, the
TorchTrainer) → loop.py (train_loop_per_worker) → stream.py (the masked input) → step.py (one optimizer step,
lr schedule, evaluation) → state.py (resumable checkpoint state) → metrics.py (metrics.csv, TensorBoard, curves).
"""

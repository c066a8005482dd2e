"""Training: the loop (`loop`, nanoGPT style), warm starts from a float model (`warmstart`), the checkpoint
file (`checkpoints`), and the export of a checkpoint to the model file synthesis reads (`export`)."""

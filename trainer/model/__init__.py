"""The model: the U-Net (`unet`), multi-SWA training of one member and of an ensemble (`train`,
`init_weights`), ONNX export (`export`), the artifact's checks (`artifact`) and running an
exported ensemble offline (`predict`). Imports `trainer.data` only."""

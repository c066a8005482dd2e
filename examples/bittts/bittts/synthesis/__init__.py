"""Speaking an exported model: `voice` holds what every runtime shares (the text front end, the bounds; torch-free),
`synthesizer` loads a packed safetensors file and speaks on torch, `onnx_voice` speaks an ONNX voice on
onnxruntime without torch, `long_text` splits text of any length and streams its audio in bounded memory, `server`
answers HTTP requests with it."""

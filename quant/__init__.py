"""Quantization and the 16 MB artifact (SPEC 5): the PyTorch reference quantizer.

    quant.gptq        row_scales(weight) -> fp32 [rows]            O's int6 step per row (1/31 floor)
                      quantize_layer(weight, hessian, scale, *, block_size=128, damping=0.01,
                                     order="descending", inverse="cholesky") -> int8 codes in [-31, 31]
                      (kernels/gptq.py's reference; calibration calls kernels.gptq_quantize_layer, which
                      runs the Triton kernel on the triton backend), quantize_rtn, int8_row_quantize,
                      dequantize, layer_objective
    quant.scheme      tensor_kind(name, numel, small_numel) -> "int6" | "int8" | "fp16", QuantizedTensor (also
                      R1's kinds "int7", "gate_int8" and LQER factors (quant.lqer)),
                      quantize_state_dict(state, small_numel, int6_codes=None), dequantize_state_dict
    quant.methods     METHODS {name: QuantMethod}: RoundToNearest "rtn", GPTQ "gptq", LoopAwareGPTQ
                      "loop_aware", Frontier "frontier" (QUANT_METHOD); @register adds one
    quant.frontier    frontier_quantize(state_dict, hessians, cfg): R1's scheme (QUANT.md Q.3), SDClip GPTQ
                      (quant.gptq.sdclip_quantize) by group, int8 gate rows, fp16 small tensors, LQER (quant.lqer)
    quant.calibrate   collect_hessians(model, forward, batches, layers); Calibrator(...).quantize(method)
                      for any name in METHODS, sharing Hessians and GPTQ codes between methods
    quant.artifact    the file format: write_artifact (atomic; OverBudgetError over 16,000,000 B;
                      container="ouroptz" (default) | "pergroup" with coder="auto" | "ans" | "lrzip" | "brotli"),
                      read_artifact (ArtifactError on a bad file or a coder this build cannot read),
                      similarity_order (R1's row order), pack_int6_stream / unpack_int6_stream (the optional
                      6-bit encoding), code_bytes
    quant.load        load_model(path, device, quant_linear=None) -> (fresh model, config), int6 layers as
                      kernels.int6.QuantLinear by default on CUDA (use_quant_linear)
    quant.ledger      build_ledger(path), format_ledger(ledger): bytes per category, projection
    quant.export      export_run(model, cfg, run_dir, *, val_tokens, luts, train_paths | calib_tokens,
                                 log=print, reserve_seconds=None, float_val=None, compare=None) -> dict
                      the one call the trainer makes after training (see its docstring for the dict)
    quant.generate    generate(model, prompt_ids, n, temperature=, top_k=, seed=) with a KV cache (model/decode.py)

CLIs: `python -m quant --checkpoint runs/<id>/final_model.pt` (the export step for a saved run),
`python -m quant.inspect runs/<id>/final_model.int6.ptz` (the size ledger),
`python -m quant.generate --artifact runs/<id>/final_model.int6.ptz --prompt "..." --tokens 64` (sampling) and
`python -m quant.records export|check|stats` (a submission's records folder from finished runs).
Imports: quant/ uses kernels/, model/, train.data and train.evaluate, never the training loop.
"""
from .frontier import frontier_quantize  # as quant.frontier_quantize

__all__ = ["frontier_quantize"]

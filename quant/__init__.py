"""Quantization and the 16 MB artifact (SPEC 5): the PyTorch reference quantizer.

    quant.gptq        row_scales(weight) -> fp32 [rows]            O's int6 step per row (1/31 floor)
                      quantize_layer(weight, hessian, scale, *, block_size=128, damping=0.01,
                                     order="descending", inverse="cholesky") -> int8 codes in [-31, 31]
                      quantize_rtn, int8_row_quantize, dequantize, layer_objective
    quant.calibrate   collect_hessians(model, forward, batches, layers); Calibrator(...).quantize(method)
                      with method "rtn" | "gptq" | "loop_aware"
    quant.artifact    quantize_state_dict, write_artifact (atomic; OverBudgetError over 16,000,000 B),
                      read_artifact (ArtifactError on a bad file), load_model(path, device, quant_linear=None)
                      -> (fresh model, config), int6 layers as kernels.int6.QuantLinear by default on CUDA,
                      pack_int6 / unpack_int6, code_bytes
    quant.ledger      build_ledger(path), format_ledger(ledger): bytes per category, projection
    quant.export      export_run(model, cfg, run_dir, *, val_tokens, luts, train_paths | calib_tokens,
                                 log=print, reserve_seconds=None, float_val=None, compare=None) -> dict
                      the one call the trainer makes after training (see its docstring for the dict)
    quant.generate    generate(model, prompt_ids, n, temperature=, top_k=, seed=) with a KV cache (model/decode.py)

CLIs: `python -m quant --checkpoint runs/<id>/final_model.pt` (the export step for a saved run),
`python -m quant.inspect runs/<id>/final_model.int6.ptz` (the size ledger) and
`python -m quant.generate --artifact runs/<id>/final_model.int6.ptz --prompt "..." --tokens 64` (sampling).
Imports: quant/ uses kernels/, model/, train.data and train.evaluate, never the training loop.
"""

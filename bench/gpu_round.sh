#!/usr/bin/env bash
# One lent-GPU call: install .device's wheels, then run the named rounds in order, each under its own time
# limit, results and logs into $OUT. The machine is bare each time, so every round writes the synthetic
# models it needs into /tmp/models (--cleanup deletes a family's files after its last job: the disk holds one).
#
#   bash bench/gpu_round.sh flux_e2e zimage_e2e         # inside device.run, with carry [".device"]
#   LOWVRAM_GIT_COMMIT=$(git rev-parse HEAD) ...       # the hash, sent from here: results record it
#
# Rounds (what each measures is in bench/README.md, "Changed since the last GPU run"):
#   recheck        the fixes of session 4: Flux 8 GB tier (cold and warm start), compile fidelity, ladder, NewBie
#   flux_e2e       Flux 8 GB workflow (tier, core; tier again after a warm-up start), flux_dev_24gb's ladder
#   zimage_e2e     Z-Image-Turbo 16 GB workflow with its LoRA (tier, core)
#   fp8_compile    issue #3: ComfyUI bf16, ComfyUI bf16 + TorchCompileModel, ours fp8 (+ TorchCompileModel)
#   dequant_sweep  issue #3: the dequant kernel's tiles over a Flux step's weights, GPU time only (CUDA graphs)
#   newbie_issue7  issue #7: newbie_24gb resident bf16 unconstrained beside newbie_12gb's 6 GiB rows, one run
#   newbie_warm    issue #7: newbie_12gb's 6 GiB rows, each after a warm-up start (compiled: a warm cache)
#   launch_newbie  issue #7: the same for one NewBie model call, 1 and 2 images per call
#   flux8_lean     issue #8: flux_dev_8gb and flux_dev_24gb (ours) beside the official graph fp8 unconstrained, each
#                  after a warm-up start
#   newbie_lean    issue #7 after the leaner fp8 Linear: resident bf16 and the 6 GiB fp8 row in one run, cold,
#                  then both again each after a warm-up start
#   profile_first  issues #7/#8: call trees of the first prompt (flux_dev_8gb warm start, NewBie 6 GiB cold)
#   te_stream_flux, te_stream_zimage, te_stream_flux1216   issue #8
#   bar8           issue #8: flux_dev_8gb first prompt (warm start, call trees) and the official graph unconstrained
#   bar8_twice     issue #8: ours and the official graph, alternating, twice on one machine
#   tier_newbie, tier_rest   issue #8: the other Float8DiTLoader/NewBieDiTLoader workflows at their tier, ours and core
#   load_ab24      Float8DiTLoader async against serial (LOWVRAM_SERIAL_LOAD=1) on flux_dev_24gb and _8gb
#   tier_refresh   issue #8: the README's tier table for the workflows that changed (Flux 8/12/16, Z-Image 12): the workflows with and without ChunkedOffloadTextEncoder
#   launch_bound   host time to issue one Flux step of eager fp8 linears, with and without an NVML polling thread
#   blocks_compile issue #3: ComfyUI bf16, ours fp8 eager and with CompileModelBlocks (rel L2 to eager)
#   dequant_check  issue #3: ComfyUI bf16 and ours dequant in one run, and the dequant kernel's micro benchmark
#   fp8_all        issue #3 in one run: every ComfyUI mode, ours dequant and fp8, + CompileModelBlocks, the loads
#   newbie_extra   issue #7: the NewBie pipeline in 6 GiB with fp8 and with NF4 text encoders
#   calibrate      issue #6: VRAMGuard's estimator on NewBie and SDXL (decode refit, split batches)
#   offload_flux   issue #4: Flux offload ratios at 12/8/6/4 GiB;  calibrate_flux: issue #6 on Flux
#   ladder_flux, ladder_sdxl, ladder_newbie, ladder_zimage   issue #6: the adapt ladder of every shipped workflow
#   offload_families   issue #4: NewBie and SDXL offload rows at 8/6/4 GiB
#   swiglu         issue #7: the fused fp8 SwiGLU's bits and time on one NewBie feed-forward (no model files)
#   newbie_fused   issue #7: newbie_cold with the fused feed-forwards, then newbie_12gb layer by layer
#                  (LOWVRAM_FUSED_FFN=0) on the same machine
#   newbie_attn    issue #7: newbie_24gb unconstrained and newbie_12gb at 6 GiB, default attention and cuDNN attention
#                  (FlashAttnToggle in both graphs), one run
#   newbie_fast    issue #7: the NewBie DiT's error and call time, bf16 / fp8 / fp8 fast accumulation
#                  (bench.newbie_dit_fidelity), then newbie_24gb and newbie_12gb with and without fast accumulation
#   newbie_bar     issue #7: newbie_24gb unconstrained and newbie_12gb at 6 GiB (as shipped: fast accumulation) and
#                  with compute auto (ours-precise), on a fresh machine, then all three again after a warm-up start
#   newbie_alloc   issue #7: newbie_bar's cold half with ComfyUI's --disable-cuda-malloc (PyTorch's caching allocator)
#   newbie_graphs  issue #7: bench.newbie_dit_fidelity with each call also captured in a CUDA graph, with PyTorch's
#                  caching allocator and with cudaMallocAsync (ComfyUI's default backend)
#   newbie_compiled issue #7: newbie_24gb unconstrained, newbie_12gb at 6 GiB as shipped and with CompileModelBlocks
#                  after ChunkedOffloadUNet, on a fresh machine (inductor compiles), then again after a warm-up start
#   newbie_guard   issue #7: newbie_12gb at 6 GiB with and without VRAMGuard (its memory monitor thread), twice
#   newbie_sampler issue #7, at f524542/ba0470e only: VRAMGuard's memory sampler in a process of its own against
#                  its thread (LOWVRAM_VRAMGUARD_SAMPLER=thread), newbie_12gb at 6 GiB, newbie_24gb and the graph
#                  without VRAMGuard beside them; newbie_sampler_ab: process and thread alternating, 3 each. The
#                  process was no faster (T1433-T1438) and was taken out; on later commits both halves run the thread
#   newbie_replay  issue #7: ChunkedOffloadUNet's CUDA graphs: bench.cuda_graph_check under both allocator backends,
#                  the NewBie DiT call graphed under cudaMallocAsync, then newbie_24gb and newbie_12gb at 6 GiB with and
#                  without graphs (ours-nographs), fresh machine; newbie_replay_warm: the three again after warm-up starts
#   replay_profile issue #7: call trees of the graphed NewBie 6 GiB first prompt on a fresh machine; Z-Image-Turbo 16 GB
#                  with and without graphs
#   newbie_final   issue #7: graph checks, newbie_replay fresh and after warm-up starts, and the graphed 6 GiB prompts under
#                  the stack sampler
#   newbie_fidelity issue #7: newbie_12gb's latents at 6 GiB with and without CUDA graphs (digests must be equal)
#   newbie_fresh   issue #7: newbie_12gb at 6 GiB then newbie_24gb unconstrained, on a machine just started
#   dit6           issue #7: the NewBie DiT alone at 6 GiB (cond and uncond in one batch), fused, then layer by layer
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?OUT is not set (the device tool sets it)}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .device/whl/*.whl \
    2>/dev/null
export PYTHONPATH=/tmp/site:$PWD COMFYUI_PATH=$PWD/.device/ComfyUI PYTHONUNBUFFERED=1
M=/tmp/models
mkdir -p "$M"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader

# At most 8 files come back from $OUT: every step's log goes into one file, each result JSON is its own.
LOG=$OUT/rounds.log
run() {   # run LIMIT_S NAME CMD...: one step under a time limit; its output appended to $LOG, its tail printed
    local limit=$1 name=$2; shift 2
    local t0=$SECONDS step=/tmp/step_$name.log
    timeout "$limit" "$@" >"$step" 2>&1
    local rc=$?
    { echo "===== $name rc=$rc $((SECONDS - t0)) s: $*"; cat "$step"; } >>"$LOG"
    echo "[round] $name rc=$rc $((SECONDS - t0)) s"
    tail -n 25 "$step"
}

e2e=(python3 -m bench.workflows_e2e --models-dir "$M" --out-dir "$OUT")   # `timeout` runs commands, not functions

for round in "$@"; do
    case $round in
        flux_e2e)
            run 200 flux8_tier_core "${e2e[@]}" --workflows flux_dev_8gb --parts tier,core
            run 120 flux8_warm "${e2e[@]}" --workflows flux_dev_8gb --parts tier --warm-start
            run 170 flux24_ladder "${e2e[@]}" --workflows flux_dev_24gb --parts ladder --cleanup ;;
        recheck)   # after the warm-step timing fix and the /free retry: Flux 8 GB, compile fidelity, the ladder, NewBie
            run 150 flux8_tier "${e2e[@]}" --workflows flux_dev_8gb --parts tier
            run 110 flux8_warm "${e2e[@]}" --workflows flux_dev_8gb --parts tier --warm-start
            run 150 compile_fidelity python3 -m bench.compile_fidelity --model "$M/diffusion_models/flux1-dev.safetensors" \
                --out "$OUT/compile_fidelity.json"
            run 150 flux24_ladder "${e2e[@]}" --workflows flux_dev_24gb --parts ladder --cleanup
            run 140 newbie_extra "${e2e[@]}" --workflows newbie_12gb --parts extra --cleanup ;;
        zimage_e2e)
            run 220 zimage16 "${e2e[@]}" --workflows z_image_turbo_16gb --parts tier,core --cleanup ;;
        fp8_compile)
            run 560 fp8_compile python3 -m bench.fp8_flux --models-dir "$M" --out-dir "$OUT" \
                --comfy-modes comfy_bf16,comfy_bf16_compile --ours-modes ours_fp8_token --extras blocks_compile,torch_compile \
                --no-micro --load-repeats 1 --time-budget-s 540 ;;
        blocks_compile)   # issue #3: CompileModelBlocks on ours fp8 against ComfyUI bf16, rel L2 to our eager row
            run 400 blocks_compile python3 -m bench.fp8_flux --models-dir "$M" --out-dir "$OUT" \
                --comfy-modes comfy_bf16 --ours-modes ours_fp8_token --extras blocks_compile \
                --no-micro --load-repeats 1 --time-budget-s 380 ;;
        fp8_all)   # issue #3, every row of its table in one run (about 6 min; alone in a call)
            run 570 fp8_all python3 -m bench.fp8_flux --models-dir "$M" --out-dir "$OUT" --extras blocks_compile \
                --no-micro --load-repeats 1 --time-budget-s 540 ;;
        dequant_check)   # issue #3's dequant row beside ComfyUI bf16, and the dequant kernel alone (micro)
            run 200 dequant_check python3 -m bench.fp8_flux --models-dir "$M" --out-dir "$OUT" --comfy-modes comfy_bf16 \
                --ours-modes ours_dequant --extras "" --no-micro --load-repeats 1
            run 90 dequant_micro python3 -m bench.fp8_linear_micro --out "$OUT/fp8_linear_micro_dequant.json" \
                --variants bf16_linear,dq_triton,linear_dequant --no-compile ;;
        dequant_sweep)   # issue #3: every DequantTile over a Flux step's 304 weights in CUDA graphs (no model files)
            run 200 dequant_sweep python3 -m bench.dequant_sweep --out "$OUT/dequant_sweep.json" ;;
        newbie_issue7)   # issue #7: the resident bf16 pipeline unconstrained and the 6 GiB rows, in one run
            run 360 newbie_issue7 "${e2e[@]}" --workflows newbie_24gb,newbie_12gb --parts extra --cleanup ;;
        newbie_warm)   # issue #7: the 6 GiB rows after a throwaway start (inductor's and Triton's caches on disk warm)
            run 330 newbie_warm "${e2e[@]}" --workflows newbie_12gb --parts extra --warm-start --cleanup ;;
        flux8_lean)   # issue #8: the 8 GB workflow's first prompt against the official graph unconstrained, same run
            run 420 flux8_lean "${e2e[@]}" --workflows flux_dev_8gb,flux_dev_24gb --parts tier,extra --graphs ours,core \
                --warm-start --cleanup ;;
        profile_first)   # issues #7/#8: where the first prompt's time goes (bench.stack_sampler call trees in the log):
                         # flux_dev_8gb after a warm-up start, then NewBie's 6 GiB fp8 row on a cold start
            run 240 flux8_profile "${e2e[@]}" --workflows flux_dev_8gb --parts tier --graphs ours --warm-start \
                --stack-samples /tmp/stacks --cleanup
            run 200 newbie_profile "${e2e[@]}" --workflows newbie_12gb --parts extra --graphs ours --stack-samples \
                /tmp/stacks --cleanup ;;
        newbie_compile_profile)   # issue #7: where the compiled 6 GiB NewBie first prompt's time goes with warm caches
            run 300 newbie_compile_profile "${e2e[@]}" --workflows newbie_12gb --parts compiled --graphs ours-compiled \
                --warm-start --stack-samples /tmp/stacks --cleanup ;;
        te_stream_flux)   # issue #8: flux_dev_8gb with and without ChunkedOffloadTextEncoder (A/B, call trees), and
                          # the official graph fp8 unconstrained (the bar) in the same run
            run 330 flux8_te_ab "${e2e[@]}" --workflows flux_dev_8gb --parts tier,te_ab --graphs ours,ours-plainte \
                --warm-start --stack-samples /tmp/stacks
            run 150 flux_core_bar "${e2e[@]}" --workflows flux_dev_24gb --parts extra --graphs core --warm-start \
                --cleanup ;;
        bar8)   # issue #8: flux_dev_8gb's first prompt after a warm-up start (call trees in the log), then the official
                # graph fp8 unconstrained (the bar), same machine
            run 240 flux8_profile "${e2e[@]}" --workflows flux_dev_8gb --parts tier --graphs ours --warm-start \
                --stack-samples /tmp/stacks --cleanup
            run 150 flux_core_bar "${e2e[@]}" --workflows flux_dev_24gb --parts extra --graphs core --warm-start \
                --cleanup ;;
        bar8_twice)   # issue #8: bar8's pair of runs two times on one machine, alternating (how much each varies)
            for k in 1 2; do
                run 150 flux8_ours_$k "${e2e[@]}" --workflows flux_dev_8gb --parts tier --graphs ours --warm-start
                run 130 flux_core_bar_$k "${e2e[@]}" --workflows flux_dev_24gb --parts extra --graphs core --warm-start
            done
            rm -rf "$M" ;;
        te_stream_zimage)   # issue #8: Z-Image-Turbo 12 and 16 GB with and without ChunkedOffloadTextEncoder, then
                            # flux_dev_8gb's first and repeat prompt again (the repeat keeps the first's plan)
            run 380 zimage_te_ab "${e2e[@]}" --workflows z_image_turbo_12gb,z_image_turbo_16gb --parts tier,te_ab \
                --graphs ours,ours-plainte --warm-start --cleanup
            run 170 flux8_repeat "${e2e[@]}" --workflows flux_dev_8gb --parts tier --graphs ours --warm-start \
                --stack-samples /tmp/stacks --cleanup ;;
        te_stream_flux1216)   # issue #8: flux_dev_12gb and _16gb with and without ChunkedOffloadTextEncoder
            run 330 flux1216_te_ab "${e2e[@]}" --workflows flux_dev_12gb,flux_dev_16gb --parts tier,te_ab \
                --graphs ours,ours-plainte --warm-start --cleanup ;;
        tier_refresh)   # issue #8: the workflows that gained ChunkedOffloadTextEncoder, ours and core at their tier (cold)
            run 380 flux_tiers "${e2e[@]}" --workflows flux_dev_8gb,flux_dev_12gb,flux_dev_16gb --parts tier,core --cleanup
            run 180 zimage12_tier "${e2e[@]}" --workflows z_image_turbo_12gb --parts tier,core --cleanup ;;
        tier_newbie)   # issue #8: the NewBie workflows at their tier, ours and core (after the async loaders)
            run 560 newbie_tiers "${e2e[@]}" --workflows newbie_12gb,newbie_16gb,newbie_24gb --parts tier,core --cleanup ;;
        tier_rest)   # issue #8: Z-Image 16/24 GB and Flux 24 GB at their tier, ours and core (after the async loaders)
            run 560 rest_tiers "${e2e[@]}" --workflows z_image_turbo_16gb,z_image_turbo_24gb,flux_dev_24gb --parts tier,core \
                --cleanup ;;
        load_ab24)   # the async Float8DiTLoader against reading the file on the prompt's thread (LOWVRAM_SERIAL_LOAD=1),
                     # flux_dev_24gb and flux_dev_8gb after warm-up starts, call trees in the log
            run 150 flux24_async "${e2e[@]}" --workflows flux_dev_24gb --parts tier --graphs ours --warm-start \
                --stack-samples /tmp/stacks
            run 150 flux24_serial env LOWVRAM_SERIAL_LOAD=1 "${e2e[@]}" --workflows flux_dev_24gb --parts tier \
                --graphs ours --warm-start --stack-samples /tmp/stacks
            run 130 flux8_serial env LOWVRAM_SERIAL_LOAD=1 "${e2e[@]}" --workflows flux_dev_8gb --parts tier \
                --graphs ours --warm-start --cleanup ;;
        newbie_cold)   # issue #7: newbie_lean's first step alone (a fresh machine: kernel caches on disk cold)
            run 200 newbie_lean_cold "${e2e[@]}" --workflows newbie_24gb,newbie_12gb --parts extra --graphs ours \
                --cleanup ;;
        swiglu)
            run 90 swiglu python3 -m bench.swiglu_micro --out-dir "$OUT" ;;
        newbie_fused)   # issue #7: the 6 GiB graph and resident bf16, fresh machine; then the 6 GiB graph unfused
            run 200 newbie_fused_cold "${e2e[@]}" --workflows newbie_24gb,newbie_12gb --parts extra --graphs ours
            run 120 newbie_unfused env LOWVRAM_FUSED_FFN=0 "${e2e[@]}" --workflows newbie_12gb --parts extra \
                --graphs ours --cleanup ;;
        newbie_attn)
            run 330 newbie_attn "${e2e[@]}" --workflows newbie_24gb,newbie_12gb --parts extra,attn \
                --graphs ours,ours-cudnn --cleanup ;;
        newbie_fast)
            run 150 newbie_fidelity python3 -m bench.newbie_dit_fidelity --models-dir "$M" --out-dir "$OUT"
            run 330 newbie_fast "${e2e[@]}" --workflows newbie_24gb,newbie_12gb --parts extra,fast \
                --graphs ours,ours-fast --cleanup ;;
        newbie_bar)
            run 280 newbie_bar_cold "${e2e[@]}" --workflows newbie_24gb,newbie_12gb --parts extra,precise \
                --graphs ours,ours-precise
            run 300 newbie_bar_warm "${e2e[@]}" --workflows newbie_24gb,newbie_12gb --parts extra,precise \
                --graphs ours,ours-precise --warm-start --cleanup ;;
        newbie_compiled)
            run 260 newbie_compiled_cold "${e2e[@]}" --workflows newbie_24gb,newbie_12gb --parts extra,compiled \
                --graphs ours,ours-compiled
            run 300 newbie_compiled_warm "${e2e[@]}" --workflows newbie_24gb,newbie_12gb --parts extra,compiled \
                --graphs ours,ours-compiled --warm-start --cleanup ;;
        newbie_guard)
            run 170 newbie_guard_a "${e2e[@]}" --workflows newbie_12gb --parts extra,noguard --graphs ours,ours-noguard
            run 170 newbie_guard_b "${e2e[@]}" --workflows newbie_12gb --parts extra,noguard --graphs ours,ours-noguard
            run 230 newbie_guard_ref "${e2e[@]}" --workflows newbie_24gb,newbie_12gb --parts extra,noguard \
                --graphs ours,ours-noguard --cleanup ;;
        newbie_sampler)
            run 200 newbie_sampler_process "${e2e[@]}" --workflows newbie_24gb,newbie_12gb --parts extra,noguard \
                --graphs ours,ours-noguard
            run 120 newbie_sampler_thread env LOWVRAM_VRAMGUARD_SAMPLER=thread "${e2e[@]}" --workflows newbie_12gb \
                --parts extra --graphs ours
            run 120 newbie_sampler_process_b "${e2e[@]}" --workflows newbie_12gb --parts extra --graphs ours
            run 120 newbie_sampler_thread_b env LOWVRAM_VRAMGUARD_SAMPLER=thread "${e2e[@]}" --workflows newbie_12gb \
                --parts extra --graphs ours --cleanup ;;
        newbie_sampler_ab)
            for i in 1 2 3; do
                run 110 "newbie_ab_process_$i" "${e2e[@]}" --workflows newbie_12gb --parts extra --graphs ours
                run 110 "newbie_ab_thread_$i" env LOWVRAM_VRAMGUARD_SAMPLER=thread "${e2e[@]}" \
                    --workflows newbie_12gb --parts extra --graphs ours
            done ;;
        newbie_alloc)
            run 280 newbie_alloc env LOWVRAM_E2E_SERVER_ARGS=--disable-cuda-malloc "${e2e[@]}" \
                --workflows newbie_24gb,newbie_12gb --parts extra,precise --graphs ours,ours-precise --cleanup ;;
        newbie_graphs)
            run 200 newbie_graphs python3 -m bench.newbie_dit_fidelity --models-dir "$M" --out-dir "$OUT" --cuda-graphs
            mkdir -p "$OUT/async"
            run 200 newbie_graphs_async env PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync python3 -m \
                bench.newbie_dit_fidelity --models-dir "$M" --out-dir "$OUT/async" --cuda-graphs ;;
        newbie_replay)   # issue #7: ChunkedOffloadUNet's CUDA graphs. The capture check under both allocator backends,
                         # the whole NewBie DiT call captured under cudaMallocAsync, then newbie_24gb unconstrained
                         # and newbie_12gb at 6 GiB with and without graphs, on a fresh machine
            run 120 graph_check_native env PYTORCH_CUDA_ALLOC_CONF=backend:native python3 -m bench.cuda_graph_check
            run 120 graph_check_async env PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync python3 -m bench.cuda_graph_check
            mkdir -p "$OUT/async"
            run 200 newbie_graphs_async env PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync python3 -m \
                bench.newbie_dit_fidelity --models-dir "$M" --out-dir "$OUT/async" --cuda-graphs
            run 330 newbie_replay "${e2e[@]}" --workflows newbie_24gb,newbie_12gb --parts extra,nographs \
                --graphs ours,ours-nographs ;;
        newbie_replay_warm)   # issue #7: newbie_replay's three graphs again, each after a warm-up start
            run 400 newbie_replay_warm "${e2e[@]}" --workflows newbie_24gb,newbie_12gb --parts extra,nographs \
                --graphs ours,ours-nographs --warm-start --cleanup ;;
        replay_profile)   # issue #7: call trees of the graphed 6 GiB NewBie first prompt on a fresh machine (the first
                          # job there), then Z-Image-Turbo 16 GB with and without graphs (pixel digests must match)
            run 200 newbie_replay_profile "${e2e[@]}" --workflows newbie_12gb --parts extra --graphs ours \
                --stack-samples /tmp/stacks --cleanup
            run 330 zimage_replay "${e2e[@]}" --workflows z_image_turbo_16gb --parts tier,nographs \
                --graphs ours,ours-nographs --cleanup ;;
        newbie_final)   # issue #7: the graph checks; newbie_replay's three graphs on a fresh machine, then each after a
                        # warm-up start; then the graphed 6 GiB first and repeat prompt under the stack sampler
            run 60 graph_check_native env PYTORCH_CUDA_ALLOC_CONF=backend:native python3 -m bench.cuda_graph_check
            run 60 graph_check_async env PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync python3 -m bench.cuda_graph_check
            run 200 newbie_final_fresh "${e2e[@]}" --workflows newbie_24gb,newbie_12gb --parts extra,nographs \
                --graphs ours,ours-nographs
            run 250 newbie_final_warm "${e2e[@]}" --workflows newbie_24gb,newbie_12gb --parts extra,nographs \
                --graphs ours,ours-nographs --warm-start
            run 100 newbie_final_profile "${e2e[@]}" --workflows newbie_12gb --parts extra --graphs ours \
                --stack-samples /tmp/stacks --cleanup ;;
        newbie_fidelity)   # issue #7: the 6 GiB graph's sampled latents (SaveLatent) with and without CUDA graphs
            run 300 newbie_fidelity "${e2e[@]}" --workflows newbie_12gb --parts fidelity \
                --graphs ours-latent,ours-nographs-latent --cleanup ;;
        newbie_fresh)   # issue #7: on a machine just started, the 6 GiB graph first (its first prompt pays what the
                        # machine has not cached), then the resident bf16 pipeline unconstrained
            run 300 newbie_fresh "${e2e[@]}" --workflows newbie_24gb,newbie_12gb --parts extra --graphs ours --cleanup ;;
        dit6)   # issue #7: bench.offload_families' NewBie rows at 6 GiB, 10 steps; then ours again layer by layer
            run 240 dit6_fused python3 -m bench.offload_families --models-dir "$M" --out-dir "$OUT" --families newbie \
                --budgets 6 --steps 10
            run 240 dit6_unfused env LOWVRAM_FUSED_FFN=0 python3 -m bench.offload_families --models-dir "$M" \
                --out-dir "$OUT" --families newbie --budgets 6 --steps 10 ;;
        newbie_lean)   # issue #7: the fp8 rows only (no NF4 or compiled rows) beside resident bf16, cold, then both
                       # again each after a warm-up start (the same footing: kernel caches on disk warm for both)
            run 240 newbie_lean_cold "${e2e[@]}" --workflows newbie_24gb,newbie_12gb --parts extra --graphs ours
            run 280 newbie_lean_warm "${e2e[@]}" --workflows newbie_24gb,newbie_12gb --parts extra --graphs ours \
                --warm-start --cleanup ;;
        launch_newbie)   # issue #7: is eager fp8 host-bound on NewBie, one image per call (cond, uncond apart) and two
            run 100 launch_newbie1 python3 -m bench.eager_launch_bound --out-dir "$OUT" --model newbie --images 1 \
                --host-profile
            run 100 launch_newbie2 python3 -m bench.eager_launch_bound --out-dir "$OUT" --model newbie --images 2 ;;
        launch_bound)   # is the eager fp8 Linear bound by the host? (no model files; about 30 s)
            run 100 launch_bound python3 -m bench.eager_launch_bound --out-dir "$OUT" ;;
        newbie_extra)   # fp8, NF4 and NF4 + CompileModelBlocks text-to-image in 6 GiB
            run 300 newbie_extra "${e2e[@]}" --workflows newbie_12gb --parts extra --cleanup ;;
        offload_flux)   # issue #4: ComfyUI core and ours (eager and CompileModelBlocks) at 12/8/6/4 GiB
            run 480 offload_flux python3 -m bench.offload_flux --models-dir "$M" --out-dir "$OUT" --steps 8 \
                --blocks-compile ;;
        calibrate_flux)   # issue #6: Flux rows with the current estimator constants
            run 420 calibrate_flux python3 -m bench.vramguard_calibrate --models-dir "$M" --out-dir "$OUT" \
                --families flux --minutes 6 --faults 3 --repeat 5 ;;
        ladder_flux)   # issue #6: VRAMGuard's adapt ladder, every budget below each tier down to 4 GiB (9 rows);
            # flux_dev_24gb's 5 rungs are ladder_flux24 (all four workflows overran 330 s in T2042)
            run 330 ladder_flux "${e2e[@]}" --workflows flux_dev_8gb,flux_dev_12gb,flux_dev_16gb --parts ladder --cleanup ;;
        ladder_flux24)   # flux_dev_24gb's rungs (16 to 4 GiB)
            run 200 ladder_flux24 "${e2e[@]}" --workflows flux_dev_24gb --parts ladder --cleanup ;;
        ladder_sdxl)   # (12 rows)
            run 240 ladder_sdxl "${e2e[@]}" --workflows sdxl_12gb,sdxl_16gb,sdxl_24gb --parts ladder --cleanup ;;
        ladder_newbie)   # (12 rows)
            run 280 ladder_newbie "${e2e[@]}" --workflows newbie_12gb,newbie_16gb,newbie_24gb --parts ladder --cleanup ;;
        ladder_zimage)   # (12 rows)
            run 280 ladder_zimage "${e2e[@]}" --workflows z_image_turbo_12gb,z_image_turbo_16gb,z_image_turbo_24gb \
                --parts ladder --cleanup ;;
        offload_families)   # issue #4's NewBie (DiT) and SDXL (UNet) rows at 8/6/4 GiB
            run 240 offload_families python3 -m bench.offload_families --models-dir "$M" --out-dir "$OUT" ;;
        calibrate)
            run 300 calibrate python3 -m bench.vramguard_calibrate --models-dir "$M" --out-dir "$OUT" \
                --families newbie,sdxl --minutes 3.5 --faults 3 --repeat 5 ;;
        *) echo "[round] unknown round $round"; exit 2 ;;
    esac
done
ls -la "$OUT"

"""Compiled memory plan per device of the train step over 8 devices: replicated vs FSDP, bfloat16 compute.

    python bench/memory_plan.py [--sizes B/2 L/2 XL/2] [--batch 16] [--devices 8] [--out plan.jsonl]
    python bench/memory_plan.py --topology v5e:2x4 [--remat] ...     # XLA's TPU compiler, no TPU needed

The step is compiled from shapes alone, so nothing is allocated and any machine can plan a pod's step: for
`--devices` simulated CPU devices (`--xla_force_host_platform_device_count`), or with `--topology` for the
devices of a TPU slice, compiled ahead of time by XLA's TPU compiler (this needs the libtpu wheel that
matches jax: `pip install "jax[tpu]==<jax version>"`; a TPU is not needed). Per device it reports the state
as one device holds it (parameters, EMA, Adam moments, gradients) and XLA's plan: arguments, outputs,
aliased (donated) buffers, temporaries and their peak. The CPU compiler schedules for speed and keeps more
alive than a TPU's: read its figures as an upper bound, and the TPU compiler's as what a slice would use.
"""
import argparse, json, os, sys, time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--sizes', nargs='+', default=['B/2', 'L/2', 'XL/2'])
    ap.add_argument('--batch', type=int, default=16, help='examples per device')
    ap.add_argument('--devices', type=int, default=8, help='simulated CPU devices (ignored with --topology)')
    ap.add_argument('--topology', help='plan with XLA\'s TPU compiler for this slice, e.g. v5e:2x4 (needs libtpu)')
    ap.add_argument('--layouts', nargs='+', default=['replicated', 'fsdp'], choices=['replicated', 'fsdp'])
    ap.add_argument('--dtype', default='bfloat16')
    ap.add_argument('--remat', action='store_true')
    ap.add_argument('--cond', default='support', help="conditioning (fsdit.config.CONDS): 'support' is the seed's, 'xattn' cross-attends to the supports")
    ap.add_argument('--context-patch', type=int, default=4, help="patch of the support latents for 'context' / 'xattn' (4: 49 tokens a support at 28x28)")
    ap.add_argument('--out', help='append JSON lines here')
    a = ap.parse_args(argv)
    if a.topology: os.environ.setdefault('JAX_PLATFORMS', 'cpu')   # the host compiles; a TPU, if any, stays free
    else: os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={a.devices}"
    import jax
    from fsdit.bench import train_memory, machine_info, tpu_devices
    from fsdit.cli import CLIError, fail
    try: devices = tpu_devices(a.topology) if a.topology else None
    except CLIError as e: return fail('memory_plan', e)
    if a.topology:
        from importlib.metadata import version
        target = f"TPU {a.topology} (XLA's TPU compiler, libtpu {version('libtpu')})"   # tpu_devices found libtpu
    else:
        assert jax.device_count() == a.devices, 'set the device count before JAX is imported'
        target = f"{a.devices} CPU devices (XLA's CPU compiler)"
    gib = lambda b: b / 2**30
    rows = []
    for size in a.sizes:
        for layout in a.layouts:
            t0 = time.perf_counter()
            try:
                m = train_memory(size, a.batch, fsdp=layout == 'fsdp', devices=devices, dtype=a.dtype, cond=a.cond,
                                 context_patch=a.context_patch, **({'remat': True} if a.remat else {}))
            except Exception as e:   # a TPU compiler refuses a step that cannot fit its memory: that is a result
                if 'memory' not in str(e).lower(): raise
                m = dict(size=size, batch=a.batch, fsdp=layout == 'fsdp', error=' '.join(str(e).split())[:400])
            rec = dict(bench='memory_plan', layout=layout, dtype=a.dtype, remat=a.remat, cond=a.cond, compile_s=time.perf_counter() - t0,
                       **m, compiler=target, machine=machine_info())
            line = json.dumps(rec, default=float)
            print(line, flush=True)
            if a.out:
                with open(a.out, 'a') as f: f.write(line + '\n')
            rows.append(rec)
    print(f'\nPlanned for {target}, {a.batch} examples per device, {a.dtype} compute, float32 state, cond {a.cond!r}:')
    print(f"\n| size | layout{' (remat)' if a.remat else ''} | params | EMA | Adam | grads | arguments | temporaries | outputs | aliased | **peak** (GiB per device) |")
    print('|---|---|---|---|---|---|---|---|---|---|---|')
    for r in rows:
        if 'error' in r: print(f"| {r['size']} | {r['layout']} | does not fit: {r['error'][:160]} |"); continue
        print(f"| {r['size']} | {r['layout']} | " + ' | '.join(f"{gib(r[k]):.2f}" for k in
              ('params', 'ema', 'adam', 'grads', 'argument', 'temp', 'output', 'alias')) + f" | **{gib(r['peak']):.2f}** |")
    return 0


if __name__ == '__main__':
    sys.exit(main())

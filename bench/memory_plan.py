"""Compiled memory plan per device of the train step over 8 devices: replicated vs FSDP, bfloat16 compute.

    python bench/memory_plan.py [--sizes B/2 L/2 XL/2] [--batch 16] [--devices 8] [--out plan.jsonl]

The step is compiled for `--devices` simulated CPU devices (`--xla_force_host_platform_device_count`) from
shapes alone, so nothing is allocated and any machine can plan a pod's step. Per device it reports the state
as one device holds it (parameters, EMA, Adam moments, gradients) and XLA's plan: arguments, outputs,
aliased (donated) buffers, temporaries and their peak. The CPU compiler fuses and schedules differently from
a TPU's, so read a figure as "fits with this much to spare", not as an exact TPU number.
"""
import argparse, json, os, sys, time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--sizes', nargs='+', default=['B/2', 'L/2', 'XL/2'])
    ap.add_argument('--batch', type=int, default=16, help='examples per device')
    ap.add_argument('--devices', type=int, default=8)
    ap.add_argument('--layouts', nargs='+', default=['replicated', 'fsdp'], choices=['replicated', 'fsdp'])
    ap.add_argument('--dtype', default='bfloat16')
    ap.add_argument('--remat', action='store_true')
    ap.add_argument('--out', help='append JSON lines here')
    a = ap.parse_args(argv)
    os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={a.devices}"
    import jax
    from fsdit.bench import train_memory, machine_info
    assert jax.device_count() == a.devices, 'set the device count before JAX is imported'
    gib = lambda b: b / 2**30
    rows = []
    for size in a.sizes:
        for layout in a.layouts:
            t0 = time.perf_counter()
            m = train_memory(size, a.batch, fsdp=layout == 'fsdp', dtype=a.dtype, **({'remat': True} if a.remat else {}))
            rec = dict(bench='memory_plan', layout=layout, dtype=a.dtype, remat=a.remat, compile_s=time.perf_counter() - t0,
                       **m, machine=machine_info())
            line = json.dumps(rec, default=float)
            print(line, flush=True)
            if a.out:
                with open(a.out, 'a') as f: f.write(line + '\n')
            rows.append(rec)
    print('\n| size | layout | params | EMA | Adam | grads | arguments | temporaries | outputs | aliased | **peak** (GiB per device) |')
    print('|---|---|---|---|---|---|---|---|---|---|---|')
    for r in rows:
        print(f"| {r['size']} | {r['layout']} | " + ' | '.join(f"{gib(r[k]):.2f}" for k in
              ('params', 'ema', 'adam', 'grads', 'argument', 'temp', 'output', 'alias')) + f" | **{gib(r['peak']):.2f}** |")
    return 0


if __name__ == '__main__':
    sys.exit(main())

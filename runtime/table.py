"""The headline table: one row per stage, read from the stages' metrics.json in --result_dir, which must hold
one chain of networks (utils/lineage.py). Compression counts every parameter against the stage-1 model.

    python -m runtime.table RESULT_DIR [--write]   # print the table; --write also writes table.md/.json
"""
import argparse
import os

from utils.errors import UserError, run_main
from utils.files import atomic_write, write_json
from utils.flops import compression
from utils.lineage import STAGES, check_chain, read_metrics
COLUMNS = ("Method", "Accuracy", "GFLOPs / image", "Compression (params removed)")


def table_row(stage, method, present, **values):
    """One row (accuracy in %, compression a fraction), None where not given."""
    return {"method": method, "stage": stage, "present": present, "accuracy": None, "gflops_per_image": None,
            "params": None, "compression": None, "note": None, **values}


def build_table(result_dir):
    """Rows (table_row) in stage order. UserError when the stages' lineage does not hold."""
    check_chain(result_dir)
    metrics = {stage: read_metrics(result_dir, stage) for stage in STAGES}
    base_params = (metrics["sp"] or {}).get("params")
    rows = []
    for stage, method in ((s.name, s.method) for s in STAGES.values()):
        m = metrics[stage]
        if stage == "rl" and m and m.get("source_stage") == "sp":
            method = "dynamic pruning only"
        row = table_row(stage, method, m is not None)
        if m is None:
            row["note"] = f"not run: no {os.path.join(result_dir, stage, 'metrics.json')}"
        else:
            try:
                row.update(gflops_per_image=float(m["gflops_per_image"]), params=int(m["params"]))
                split = m.get("final_split", "test")
                if split == "test":
                    row["accuracy"] = float(m["test_acc"])
                else:  # the table is of test numbers: a run that never read test has none to show
                    row["note"] = f"no test accuracy: the stage ended on the {split} split (--final_split {split})"
            except (KeyError, TypeError, ValueError) as e:
                key = e.args[0] if isinstance(e, KeyError) else "a number"
                raise UserError(f"{os.path.join(result_dir, stage, 'metrics.json')}: no valid {key!s} (not "
                                f"written by this version's {stage} stage?)") from None
            if base_params:
                row["compression"] = compression(m["params"], base_params)
            elif m.get("compression") is not None:
                row["compression"] = m["compression"]
                row["note"] = "compression as recorded by the stage (no stage-1 metrics to compare with)"
        rows.append(row)
    return rows


def to_markdown(rows):
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        if not r["present"]:
            cells = [r["method"], "not run", "-", "-"]
        else:
            comp = "-" if r["compression"] is None else f"{100 * r['compression']:.0f}%"
            acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.2f}%"
            g = r["gflops_per_image"]
            cells = [r["method"], acc, f"{g:.2f}" if g >= 0.1 else f"{g:.3g}", comp]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- {r['method']}: {r['note']}" for r in rows if r["note"]]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def save_table(directory, text, rows, **extra):
    """<directory>/table.md (`text`) and table.json (the columns, `rows` and `extra`)."""
    atomic_write(os.path.join(directory, "table.md"), lambda f: f.write(text))  # a failed write keeps the last one
    write_json(os.path.join(directory, "table.json"), {"columns": list(COLUMNS), "rows": rows, **extra})


def write_table(result_dir):
    """Write <result_dir>/table.md and table.json; returns the Markdown text."""
    rows = build_table(result_dir)
    text = to_markdown(rows)
    save_table(result_dir, text, rows)
    return text


def main(argv=None):
    p = argparse.ArgumentParser(description="Print the headline table of a --result_dir.")
    p.add_argument("result_dir")
    p.add_argument("--write", action="store_true", help="also write table.md and table.json there")
    args = p.parse_args(argv)
    if not os.path.isdir(args.result_dir):
        raise UserError(f"{args.result_dir} is not a directory")
    print(write_table(args.result_dir) if args.write else to_markdown(build_table(args.result_dir)), end="")


if __name__ == "__main__":
    run_main(main)

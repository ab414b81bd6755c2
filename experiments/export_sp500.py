"""Write the S&P 500 sample (daily adjusted closes 1999-2018, from the optional arch package) as a CSV for data=returns.

    pip install 'fhmv_jax[data]'                      # or: pip install arch
    python experiments/export_sp500.py                # writes data/sp500.csv (columns date, price)
    python experiments/export_sp500.py --out prices.csv
    python experiments/train.py data=returns data.path=data/sp500.csv model=fhmv_paper
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

from fhmv_jax.data import sp500_prices


def write_price_csv(path: str | os.PathLike, dates, prices) -> Path:
    """Write ``date,price`` rows (ISO dates) to ``path``, creating its folder; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["date", "price"])
        writer.writerows((str(d), repr(float(p))) for d, p in zip(dates, prices, strict=True))
    return path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/sp500.csv", help="the CSV to write (default: data/sp500.csv)")
    args = parser.parse_args(argv)
    try:
        dates, prices = sp500_prices()
    except ImportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    path = write_price_csv(args.out, dates, prices)
    print(f"wrote {path}: {len(prices)} daily prices {dates[0]} to {dates[-1]}"
          f" ({len(prices) - 1} returns); train with data=returns data.path={path} model=fhmv_paper")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

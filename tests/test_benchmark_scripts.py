"""What the benchmark scripts promise beyond their timings, which are never asserted here.

`cpu_vs_torch.py` keeps torch out of the default install: without torch it says so in one line
and exits with status 2 (no traceback); where torch is present, its matrix-products comparison
reports the rates of both sides and their ratio. `infer.py` runs on its tiny model and reports
every padded batch of the texts it times. `score.py` (PLL scoring against PyTorch's loop) keeps
torch out the same way, and where torch is present reports both sides and how far apart their
PLLs are.
"""

import importlib.util
import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

HAS_TORCH = importlib.util.find_spec('torch') is not None


def benchmark(script: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, str(ROOT / 'benchmarks' / script), *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300, check=False)


def cpu_vs_torch(*args: str) -> subprocess.CompletedProcess:
  return benchmark('cpu_vs_torch.py', *args)


@pytest.mark.skipif(HAS_TORCH, reason='torch is installed here: the torch-less path is CI\'s')
def test_without_torch_it_says_so_in_one_line_and_exits_2():
  result = cpu_vs_torch('--only=products')
  assert result.returncode == 2, result.stderr
  assert result.stderr.strip().count('\n') == 0, result.stderr
  assert 'torch' in result.stderr and 'Traceback' not in result.stderr


def test_an_unknown_comparison_is_refused_by_name():
  result = cpu_vs_torch('--only=products,train-huge')
  assert result.returncode == 2
  assert 'train-huge' in result.stderr


@pytest.mark.skipif(HAS_TORCH, reason='torch is installed here: the torch-less path is CI\'s')
def test_score_benchmark_without_torch_says_so_in_one_line_and_exits_2():
  result = benchmark('score.py', '--shape=tiny')
  assert result.returncode == 2, result.stderr
  assert result.stderr.strip().count('\n') == 0, result.stderr
  assert 'torch' in result.stderr and 'Traceback' not in result.stderr


@pytest.mark.skipif(not HAS_TORCH, reason='needs torch (pip install torch==2.13.0, CPU build)')
def test_score_benchmark_reports_both_sides_and_their_agreement(tmp_path):
  report_path = tmp_path / 'score.json'
  result = benchmark('score.py', '--shape=tiny', '--texts=2', '--words=6', '--rounds=1',
                     f'--json={report_path}')
  assert result.returncode == 0, result.stderr[-2000:]
  row = json.loads(report_path.read_text())['plain-loop']
  assert row['ours_texts_per_s'] > 0 and row['theirs_texts_per_s'] > 0
  assert row['ratio'] == pytest.approx(row['ours_texts_per_s'] / row['theirs_texts_per_s'])
  assert row['max_pll_difference'] < 1e-4


@pytest.mark.skipif(not HAS_TORCH, reason='needs torch (pip install torch==2.13.0, CPU build)')
def test_products_comparison_reports_both_sides_rates_and_their_ratio(tmp_path):
  report_path = tmp_path / 'vs.json'
  result = cpu_vs_torch('--only=products', '--rounds=1', '--steps=1', f'--json={report_path}')
  assert result.returncode == 0, result.stderr
  products = json.loads(report_path.read_text())['products']
  assert len(products) == 5
  for name, row in products.items():
    assert row['ours_GFLOP/s'] > 0 and row['theirs_GFLOP/s'] > 0, name
    assert row['ratio'] == pytest.approx(row['ours_GFLOP/s'] / row['theirs_GFLOP/s'])


def test_infer_benchmark_reports_every_padded_batch_it_timed(tmp_path):
  """`benchmarks/infer.py` on its tiny model: the texts it times make one batch per padded
  length, and it reports each of them."""
  report_path = tmp_path / 'infer.json'
  result = benchmark('infer.py', '--repeats=1', '--batch=16', f'--json={report_path}')
  assert result.returncode == 0, result.stderr[-2000:]
  report = json.loads(report_path.read_text())
  assert sum(rows for rows, _ in report['padded_shapes']) >= report['batch'] == 16
  assert report['steady_texts_per_s_median'] > 0

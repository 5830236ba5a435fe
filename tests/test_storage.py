"""Workdirs on cloud storage: every file of a run goes through one path type that knows gs://.

The gs:// tests run against a GCS emulator on 127.0.0.1 (`tests/gcs_emulator.py`):
gcsfs reaches it through STORAGE_EMULATOR_HOST, tensorstore (orbax's arrays) through
TENSORSTORE_GCS_HTTP_URL.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from mlm_jax import infer
from mlm_jax import metric_writers
from mlm_jax import storage
from mlm_jax.errors import UserError
from tests.conftest import GCS_BUCKET as BUCKET
from tests.conftest import ROOT


def _train_cli(cwd, env, *flags) -> subprocess.Popen:
  return subprocess.Popen(
      [sys.executable, str(ROOT / 'run_train.py'), f'--config={ROOT}/configs/tiny_test.py',
       *flags], cwd=cwd, env=dict(os.environ, PYTHONUNBUFFERED='1', PYTHONPATH=str(ROOT), **env),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow  # About 6 minutes on 2 cores: run with `python -m pytest -m slow`.
def test_a_gs_workdir_trains_is_preempted_resumes_and_serves_fill_mask(
    gcs_env, tiny_run, tmp_path, monkeypatch):
  """The tiny run with its workdir in the bucket, stopped by SIGTERM halfway and resumed,
  ends with the parameters of the local uninterrupted run."""
  for name, value in gcs_env.items():
    monkeypatch.setenv(name, value)
  bucket = storage.path(f'gs://{BUCKET}')
  workdir = f'gs://{BUCKET}/run'
  flags = [f'--workdir={workdir}']

  first = _train_cli(tmp_path, gcs_env, *flags)
  try:
    deadline = time.time() + 240
    while not any(r['step'] >= 5 for r in metric_writers.read_metrics(workdir)):
      assert time.time() < deadline and first.poll() is None, first.stderr.read()[-3000:]
      time.sleep(0.2)
    first.send_signal(signal.SIGTERM)
    _, stderr = first.communicate(timeout=240)
  finally:
    first.kill()
    first.wait()
  assert first.returncode == 128 + signal.SIGTERM, stderr[-3000:]
  second = _train_cli(tmp_path, gcs_env, *flags)
  stdout, stderr = second.communicate(timeout=300)
  assert second.returncode == 0, stderr[-3000:]
  assert 'Resuming from the checkpoint at step' in stdout

  assert not (tmp_path / 'gs:').exists()  # Nothing went to a local folder named after the URL.
  run = bucket / 'run'
  for expected in ('checkpoints/20', 'tokenizer/tokenizer_config.json', 'model/config.json',
                   'export/model.safetensors', 'export/tokenizer_config.json', 'tensorboard'):
    assert (run / expected).exists(), expected
  steps = [r['step'] for r in metric_writers.read_metrics(workdir) if 'loss' in r]
  assert steps == sorted(set(steps)) and steps[-1] == 20
  local = jax.tree_util.tree_leaves(infer.load_predictor(tiny_run[1]).params)
  for name in (workdir, f'{workdir}/export'):
    predictor = infer.load_predictor(name)
    for a, b in zip(jax.tree_util.tree_leaves(predictor.params), local):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert infer.fill_mask(predictor, ['Cells get <mask> from food.'], top_k=2)[0][0]


def test_a_gs_workdir_without_credentials_fails_at_start_naming_the_bucket(tmp_path):
  env = {k: v for k, v in os.environ.items()
         if k not in ('STORAGE_EMULATOR_HOST', 'GOOGLE_APPLICATION_CREDENTIALS')}
  # No metadata server either; one probe of it, not google-auth's three with backoff (3 s).
  env.update(CLOUDSDK_CONFIG=str(tmp_path / 'gcloud'), GCE_METADATA_HOST='127.0.0.1:9',
             GCE_METADATA_IP='127.0.0.1:9', GCE_METADATA_DETECT_RETRIES='1',
             PYTHONPATH=str(ROOT))
  result = subprocess.run(
      [sys.executable, str(ROOT / 'run_train.py'), f'--config={ROOT}/configs/tiny_test.py',
       '--workdir=gs://my-bucket/eli5'], cwd=tmp_path, env=env, capture_output=True,
      text=True, timeout=300, check=False)
  assert result.returncode == 2
  assert result.stderr.strip().count('\n') == 0 and "'my-bucket'" in result.stderr
  assert not (tmp_path / 'gs:').exists()


def test_local_paths_are_made_absolute_and_urls_kept_as_they_are(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert str(storage.path('runs/a')) == str(tmp_path / 'runs' / 'a')
  assert str(storage.path('gs://bucket/runs/a')) == 'gs://bucket/runs/a'


def test_hosts_sharing_a_pid_do_not_delete_each_others_write_probe(tmp_path):
  """Threads share their PID, as processes on different hosts often do in containers."""
  errors = []

  def probe(host):
    try:
      for _ in range(100):
        storage.check_writable(tmp_path, host=host)
    except UserError as e:
      errors.append(e)

  threads = [threading.Thread(target=probe, args=(host,)) for host in range(4)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  assert not errors
  assert not list(tmp_path.iterdir())  # Every probe removed.


def test_metrics_writer_on_resume_drops_the_records_after_the_restored_step(tmp_path):
  writer = metric_writers.MetricsWriter(str(tmp_path))
  for step in range(1, 8):
    writer.write(step, {'loss': float(step)})
  writer.close()
  writer = metric_writers.MetricsWriter(str(tmp_path), start_step=4)
  writer.write(5, {'loss': 50.0})
  writer.close()
  records = metric_writers.read_metrics(str(tmp_path))
  assert [(r['step'], r['loss']) for r in records] == [(1, 1), (2, 2), (3, 3), (4, 4), (5, 50)]
  assert json.loads((tmp_path / 'metrics.jsonl').read_text().splitlines()[0])['step'] == 1

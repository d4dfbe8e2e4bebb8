"""The files a training run leaves in its model directory.

Kept apart from trainer.py so that the entry points that only read a run
(report, predict's checks) need not import TensorFlow to know the names.
"""

HISTORY_CSV = 'history.csv'  # A row per finished epoch.
METRICS_JSON = 'metrics.json'  # Written last: its presence means the run finished.
MODEL_FILE = 'model.keras'  # The best epoch by val AUC.
BACKUP_DIR = 'backup'  # BackupAndRestore state; removed when the run finishes.

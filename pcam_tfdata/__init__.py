"""PatchCamelyon as TFRecord shards, a tf.data pipeline, and the seed's CNNs under tf.distribute.

Two halves, one way: `pcam_tfdata.convert` turns the Kaggle TIFFs (or PCam's
HDF5 files) into records and never imports TensorFlow; `pcam_tfdata.training`
reads them (pipeline, models, strategies, the run). What both share: the
record schema (`schema`) and the handle on a records folder (`records`).
The entry points (`train`, `predict`, `report`, `data_service`, tools/*.py)
only turn flags into calls.
"""

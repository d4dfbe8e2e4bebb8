"""Kaggle TIFFs or PCam HDF5 -> center-cropped TFRecord shards: the half that never imports TensorFlow.

Sources (`kaggle`, `pcam_h5`, with `tiff` and `gzip_reader`), the plan of
splits, folds and shards (`plan`, `splits`), duplicate control
(`duplicates`), the shard writer (`shards`, run in worker processes by
`pool`), the output folder (`outdir`, with TFDS's metadata from
`tfds_metadata`), EDA pictures (`eda`) and the
synthetic demo set (`synthetic`); `from_kaggle` and `from_h5` run a
conversion end to end. Worker processes must not pay TensorFlow's import
(about 5 s and 700 MB each), so nothing here imports it: the TFRecord
framing and the `tf.train.Example` encoding are written by hand
(`shards`, `schema`) and tested byte for byte against TensorFlow's.
"""

"""Records -> tf.data -> models under tf.distribute -> a run folder: the TensorFlow half.

The input pipeline (`pipeline`, with `augment`), the seed's CNNs
(`models`), precision and strategy (`distribute`), the training step and
its callbacks (`loop`, `backup`), the run itself (`trainer`), exact
evaluation and plots (`evaluate`), test predictions and the Kaggle CSV
(`submission`), and record checks (`verify`).
"""

"""Local TFDS builders for tasks whose test split TFDS lacks (no TensorFlow needed).

Each reads the official archives from the TFDS manual dir (``<data_dir>/downloads/manual`` or
``DownloadConfig(manual_dir=...)``) and writes array_record, read back by ``tfds.data_source``:

=================  ===============================  ===========================================
builder            task                             manual files
=================  ===============================  ===========================================
``larv_gtsrb``     GTSRB test (12,630)              ``GTSRB_Final_Test_Images.zip`` and
                                                    ``GT-final_test.csv`` (or its zip
                                                    ``GTSRB_Final_Test_GT.zip``)
``larv_fer2013``   FER2013 test (7,178)             Kaggle ``fer2013.csv`` (test = PublicTest +
                                                    PrivateTest, train = Training)
``larv_rendered_sst2``  Rendered SST2 (1,821)       ``rendered-sst2.tgz`` (openai/CLIP) or the
                                                    extracted ``rendered-sst2/`` folder
``larv_eurosat``   EuroSAT re-split (test 2,700)    ``EuroSAT.zip`` (RGB) + optional
                                                    ``eurosat-{train,val,test}.txt``
``larv_resisc45``  RESISC45 re-split (test 6,300)   ``NWPU-RESISC45/`` (extracted .rar) +
                                                    ``resisc45-{train,val,test}.txt``
=================  ===============================  ===========================================

Prepare with::

    import tensorflow_datasets as tfds, larv_jax.eval.builders.gtsrb as m
    m.LarvGtsrb(data_dir=D, file_format="array_record").download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=MANUAL))

Split lists: RESISC45 uses Google's ``resisc45-{train,val,test}.txt`` (task_vectors
``src/datasets/resisc45.py`` names the URLs; one file name per line). The exact EuroSAT lists of
task_vectors / FusionBench exist only in their copies; without ``eurosat-<split>.txt`` the
builder makes a documented deterministic split instead (per class, file names sorted, permuted
with ``np.random.default_rng(0)``, 80/10/10 %), which has the same sizes but not the same images.
"""

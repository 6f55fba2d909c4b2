"""The Reptile paper's Omniglot hyperparameters as its code's README runs them (../shared/REFERENCE.md), written out
here independently of the project's defaults and presets: tests hold the project and the oracle to these."""
COMMON = {"train_shots": 10, "meta_batch": 5, "meta_lr": 1.0, "meta_lr_final": 0.0}
FIVE_WAY = {**COMMON, "classes": 5, "batch": 10, "inner_steps": 5, "lr": 0.001, "meta_iterations": 100000,
            "test_batch": 5, "test_iterations": 50}
TWENTY_WAY = {**COMMON, "classes": 20, "batch": 20, "inner_steps": 10, "lr": 0.0005, "meta_iterations": 200000,
              "test_batch": 10, "test_iterations": 50}
SETTINGS = {f"{ways['classes']}way{shots}shot": {**ways, "shots": shots} for ways in (FIVE_WAY, TWENTY_WAY)
            for shots in (1, 5)}
INNER_ADAM = {"betas": (0.0, 0.999), "eps": 1e-8, "weight_decay": 0}  # TensorFlow's Adam with beta1 = 0
BATCHNORM_EPS = 1e-3  # TensorFlow's batch_norm default, which the paper's code keeps
# The MAML paper's Omniglot settings (Finn et al. 2017, appendix A.1, and its code), in this project's flags: K
# support and K query images per class, every inner step on all the support images, the loss summed over a batch and
# divided by K, Adam (lr 0.001) as the meta-optimizer, 60,000 meta-iterations, the features averaged.
MAML_COMMON = {"meta_iterations": 60000, "meta_lr": 0.001, "meta_lr_final": 0.001, "algorithm": "maml",
               "inner_optimizer": "sgd", "meta_optimizer": "adam", "model": "maml", "loss": "per-shot"}
MAML = {"maml-5way1shot": {**MAML_COMMON, "classes": 5, "shots": 1, "train_shots": 2, "query_shots": 1, "batch": 5,
                           "inner_steps": 2, "test_batch": 5, "test_iterations": 3, "lr": 0.4, "meta_batch": 32},
        "maml-5way5shot": {**MAML_COMMON, "classes": 5, "shots": 5, "train_shots": 10, "query_shots": 5, "batch": 25,
                           "inner_steps": 2, "test_batch": 25, "test_iterations": 3, "lr": 0.4, "meta_batch": 32},
        "maml-20way1shot": {**MAML_COMMON, "classes": 20, "shots": 1, "train_shots": 2, "query_shots": 1,
                            "batch": 20, "inner_steps": 6, "test_batch": 20, "test_iterations": 5, "lr": 0.1,
                            "meta_batch": 16},
        "maml-20way5shot": {**MAML_COMMON, "classes": 20, "shots": 5, "train_shots": 10, "query_shots": 5,
                            "batch": 100, "inner_steps": 6, "test_batch": 100, "test_iterations": 5, "lr": 0.1,
                            "meta_batch": 16}}

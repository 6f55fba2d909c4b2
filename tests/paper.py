"""The Reptile paper's Omniglot hyperparameters as its code's README runs them (../shared/REFERENCE.md), written out
here independently of the project's defaults and presets: tests hold the project and the oracle to these."""
COMMON = {"train_shots": 10, "meta_batch": 5, "meta_lr": 1.0, "meta_lr_final": 0.0}
FIVE_WAY = {**COMMON, "classes": 5, "batch": 10, "iterations": 5, "lr": 0.001, "meta_iterations": 100000,
            "test_batch": 5, "test_iterations": 50}
TWENTY_WAY = {**COMMON, "classes": 20, "batch": 20, "iterations": 10, "lr": 0.0005, "meta_iterations": 200000,
              "test_batch": 10, "test_iterations": 50}
SETTINGS = {f"{ways['classes']}way{shots}shot": {**ways, "shots": shots} for ways in (FIVE_WAY, TWENTY_WAY)
            for shots in (1, 5)}
INNER_ADAM = {"betas": (0.0, 0.999), "eps": 1e-8, "weight_decay": 0}  # TensorFlow's Adam with beta1 = 0
BATCHNORM_EPS = 1e-3  # TensorFlow's batch_norm default, which the paper's code keeps

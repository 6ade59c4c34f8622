# A config package (Hydra reads it as pkg://cl_example.configs): its folders are cl-run's config groups.

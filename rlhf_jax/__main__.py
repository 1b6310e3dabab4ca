from rlhf_jax import jobs

jobs.main()

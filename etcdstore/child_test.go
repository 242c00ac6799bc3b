package etcdstore_test

const childEnv = "GRANARY_TEST_CHILD"

func childMain() int { return 0 }

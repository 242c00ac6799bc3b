package etcdstore

// SetTestHookCleanup installs fn to run when a waiting attempt of s has
// seen a publish and released its callers, before it leaves the lock
// queue. Call it before s is used.
func SetTestHookCleanup(s *Store, fn func(id string)) { s.testHookCleanup = fn }

// SetTestHookWait installs fn to run when an attempt of s starts to wait,
// between its read of the package's state and the start of its watches.
// Call it before s is used.
func SetTestHookWait(s *Store, fn func(id string)) { s.testHookWait = fn }

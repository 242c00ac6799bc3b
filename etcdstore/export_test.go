package etcdstore

// SetTestHookCleanup installs fn to run when a waiting attempt of s has
// seen a publish and released its callers, before it leaves the lock
// queue. Call it before s is used.
func SetTestHookCleanup(s *Store, fn func(id string)) { s.testHookCleanup = fn }

// SetTestHookWait installs fn to run when an attempt of s starts to wait,
// between its read of the package's state and the start of its watches.
// Call it before s is used.
func SetTestHookWait(s *Store, fn func(id string)) { s.testHookWait = fn }

// SetTestHookUpload installs fn to run when a build's upload to the remote
// cache has taken its reference, before the upload starts. Call it before
// s is used.
func SetTestHookUpload(s *Store, fn func(id string)) { s.testHookUpload = fn }

// Closed reports whether Close has begun.
func Closed(s *Store) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}

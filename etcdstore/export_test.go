package etcdstore

import (
	"context"
	"time"
)

// SetTestHookCleanup installs fn to run when a waiting attempt of s has
// seen a publish and released its callers, before it leaves the lock
// queue. Call it before s is used.
func SetTestHookCleanup(s *Store, fn func(id string)) { s.testHookCleanup = fn }

// SetTestHookWait installs fn to run when an attempt of s starts to wait,
// between its read of the package's state and the start of its watches.
// Call it before s is used.
func SetTestHookWait(s *Store, fn func(id string)) { s.testHookWait = fn }

// AwaitVisible calls s.awaitVisible: the lead wires it into the fast path,
// the waiters and IncRef; tests call it where that is not done yet.
func AwaitVisible(ctx context.Context, s *Store, id string, rec *PackageRecord) error {
	return s.awaitVisible(ctx, id, rec)
}

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

// SetSealProgressEvery sets how often sealing reports progress and returns
// a function that restores the default.
func SetSealProgressEvery(d time.Duration) (restore func()) {
	old := sealProgressEvery
	sealProgressEvery = d
	return func() { sealProgressEvery = old }
}

// SetTestHookRetake installs fn to run before s takes again a reference
// whose key etcd deleted behind its back (fn may block it). Call it
// before the deletion.
func SetTestHookRetake(s *Store, fn func(id string)) { s.testHookRetake = fn }

// SetTestHookInvalidate sets a hook run after Invalidate read the graph.
func SetTestHookInvalidate(s *Store, fn func(id string)) { s.testHookInvalidate = fn }

// LockPrefix is the key prefix of id's lock queue in s (one key per store
// that holds or waits for the lock).
func LockPrefix(s *Store, id string) string { return s.keys.LockPrefix(id) }

package etcdstore

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"time"
)

// prepareAttempt clears what an earlier attempt left and creates the
// attempt's directories. It runs under the package lock. prev is the build
// record read when the lock was taken (nil if none).
//
// It never trusts this host's cached view of the shared root: a host that
// saw the package before another host removed it may still hold a positive
// entry for pkgs/<id>, and one that looked before it was created a negative
// one. So it asks the server: it revalidates pkgs/ and opens
// pkgs/<id>/contents (an open goes to the server on NFS, close-to-open, and
// on FUSE), and it creates each directory with an exclusive Mkdir:
//
//   - contents/ present: the tree of an attempt that died, whose builder
//     may be frozen rather than dead. After the lock delay the whole
//     pkgs/<id> goes to the trash (never deleted in place).
//   - only logs/ present: an attempt that failed cleanly (its tree went to
//     the trash, its logs stay). No lock delay: nothing runs there.
//   - Mkdir of contents/ finds it after all (a tree the look missed):
//     treated as leftovers as above, then created again, once.
//   - a parent missing (ENOENT): created, and the Mkdir retried.
func (s *Store) prepareAttempt(ctx context.Context, id string, prev *BuildRecord) error {
	for round := 0; ; round++ {
		revalidate(s.pkgsDir(), s.pkgDir(id))
		there, err := dirOnServer(s.outputDir(id))
		if err != nil {
			return err
		}
		if there {
			if round == 2 {
				return fmt.Errorf("%s is still there after it was moved to the trash twice: something else writes to the shared root", s.outputDir(id))
			}
			if err := s.clearDeadAttempt(ctx, id, prev); err != nil {
				return err
			}
		}
		err = s.makeAttemptDirs(id)
		if errors.Is(err, fs.ErrExist) {
			continue // a tree appeared after all: clear it under the lock delay
		}
		return err
	}
}

// clearDeadAttempt waits the lock delay, so that a frozen builder of the
// dead attempt notices its lost lease, then moves pkgs/<id> to the trash.
func (s *Store) clearDeadAttempt(ctx context.Context, id string, prev *BuildRecord) error {
	owner := "an earlier attempt"
	if prev != nil {
		owner = fmt.Sprintf("the attempt of %s (pid %d)", prev.Host, prev.PID)
	}
	s.emit(Event{Kind: EventLockDelay, ID: id, Elapsed: s.opt.lockDelay, Host: s.opt.host, PID: s.pid})
	s.opt.logger.Info("moving leftovers aside after the lock delay", "id", id, "of", owner, "delay", s.opt.lockDelay)
	t := time.NewTimer(s.opt.lockDelay)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
		return ctx.Err()
	}
	return s.moveToTrash(s.pkgDir(id))
}

// makeAttemptDirs creates pkgs/<id> (kept if it holds a failed attempt's
// logs), then contents/ exclusively, then logs/. An error wrapping
// fs.ErrExist means contents/ exists.
func (s *Store) makeAttemptDirs(id string) error {
	if err := mkdirParents(s.pkgDir(id), s.pkgsDir()); err != nil && !errors.Is(err, fs.ErrExist) {
		return err
	}
	if err := mkdirParents(s.outputDir(id), s.pkgDir(id)); err != nil {
		return err
	}
	if err := os.Mkdir(s.logDir(id), 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
		return err
	}
	return nil
}

// mkdirParents makes dir exclusively; if its parent is missing (this host's
// cache said it was there), it makes the parent and tries again.
func mkdirParents(dir, parent string) error {
	err := os.Mkdir(dir, 0o755)
	if errors.Is(err, fs.ErrNotExist) {
		if perr := os.Mkdir(parent, 0o755); perr != nil && !errors.Is(perr, fs.ErrExist) {
			return perr
		}
		err = os.Mkdir(dir, 0o755)
	}
	return err
}

// dirOnServer reports whether dir exists, by opening it: unlike a stat, an
// open is not answered from the attribute cache of an NFS (or FUSE) client.
func dirOnServer(dir string) (bool, error) {
	f, err := os.Open(dir)
	if err == nil {
		f.Close()
		return true, nil
	}
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	return false, err
}

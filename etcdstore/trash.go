package etcdstore

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
	"time"
)

// The trash on a shared volume. Removed trees are renamed into
// <root>/.trash (one atomic step on the server) and deleted from there in
// the background, file by file, never all at once:
//
//   - A file deleted while some process still has it open is renamed by
//     its NFS client to .nfsXXXX (FUSE: .fuse_hiddenXXXX) and deleted on
//     last close. Deleting that name on the same host only renames it
//     again; deleting it from another host deletes it for real and breaks
//     the process that has it open (ESTALE). So such files are left alone
//     until they are SillyMaxAge old (by ctime: the rename sets it), the
//     directories that hold them stay, and the entry counts as pending.
//   - Every failure to delete is logged and sent as EventTrashFailed; the
//     next sweep (Prune) tries again.
//   - The deletion stops when the store closes (a CLI's `rm` does not wait
//     for a large tree); Prune finishes it later.

// SillyMaxAge is how long files that an NFS or FUSE client keeps for a
// deleted-but-open file (.nfs*, .fuse_hidden*) are left in the trash. Older
// ones belong to a client that crashed and are deleted.
const SillyMaxAge = 24 * time.Hour

// TrashResult says what one deletion of a trash entry did.
type TrashResult struct {
	Deleted bool    // the entry is gone
	Pending int     // files kept because a process may still have them open
	Errs    []error // every failure, at most maxTrashErrs of them
}

const maxTrashErrs = 10

// moveToTrash renames path into the root's trash and deletes it in the
// background (until the store closes). A missing path is not an error.
func (s *Store) moveToTrash(path string) error {
	var rnd [4]byte
	rand.Read(rnd[:])
	dst := filepath.Join(s.trashDir(), fmt.Sprintf("%s.%d.%x", filepath.Base(path), time.Now().UnixNano(), rnd))
	if err := os.Rename(path, dst); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		return fmt.Errorf("move %s to trash: %w", path, err)
	}
	// After Close, Prune sweeps the trash later.
	s.spawn(func() { s.reportTrash(dst, s.deleteTrash(s.ctx, dst)) })
	return nil
}

// reportTrash logs and emits what deleting one trash entry left behind.
func (s *Store) reportTrash(path string, r TrashResult) {
	for _, err := range r.Errs {
		s.opt.logger.Warn("cannot delete from the trash; the next gc tries again", "path", path, "err", err)
		s.emit(Event{Kind: EventTrashFailed, Err: err})
	}
	if r.Pending > 0 {
		s.opt.logger.Info("trash entry kept: files in it are still open somewhere", "path", path, "open_files", r.Pending, "kept_up_to", SillyMaxAge)
		s.emit(Event{Kind: EventTrashPending, Size: int64(r.Pending), Err: fmt.Errorf("%s: %d file(s) still open somewhere", path, r.Pending)})
	}
}

// deleteTrash deletes the tree at path bottom-up, keeping young .nfs* and
// .fuse_hidden* files and the directories that hold them. It stops, leaving
// the rest, when ctx ends.
func (s *Store) deleteTrash(ctx context.Context, path string) TrashResult {
	var r TrashResult
	addErr := func(err error) {
		if len(r.Errs) < maxTrashErrs {
			r.Errs = append(r.Errs, err)
		}
	}
	var del func(p string, d fs.DirEntry) bool // reports whether p is gone
	del = func(p string, d fs.DirEntry) bool {
		if ctx.Err() != nil {
			return false
		}
		if silly(d.Name()) {
			if fi, err := os.Lstat(p); err == nil && time.Since(ctime(fi)) < SillyMaxAge {
				r.Pending++
				return false
			}
		}
		if !d.IsDir() {
			if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
				addErr(err)
				return false
			}
			return true
		}
		os.Chmod(p, 0o700) //nolint:errcheck // published trees are read-only; Remove reports what matters
		ents, err := os.ReadDir(p)
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			addErr(err)
			return false
		}
		empty := true
		for _, e := range ents {
			if !del(filepath.Join(p, e.Name()), e) {
				empty = false
			}
		}
		if !empty {
			return false
		}
		if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
			if errors.Is(err, syscall.ENOTEMPTY) || errors.Is(err, syscall.EEXIST) || errors.Is(err, syscall.EBUSY) {
				// Something appeared meanwhile (a concurrent delete's
				// silly rename): pending, the next sweep looks again.
				r.Pending++
			} else {
				addErr(err)
			}
			return false
		}
		return true
	}
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		r.Deleted = true
		return r
	}
	if err != nil {
		addErr(err)
		return r
	}
	r.Deleted = del(path, fs.FileInfoToDirEntry(fi))
	return r
}

//go:build !linux

package etcdstore

import (
	"os"
	"syscall"
	"time"
)

// syncTree flushes the directory itself; other systems have no syncfs.
func syncTree(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}

// ctime is the modification time of fi here; Linux uses the change time.
func ctime(fi os.FileInfo) time.Time { return fi.ModTime() }

// openDir opens dir and returns its descriptor.
func openDir(dir string) (int, error) {
	fd, err := syscall.Open(dir, syscall.O_RDONLY, 0)
	if err != nil {
		return -1, &os.PathError{Op: "open", Path: dir, Err: err}
	}
	return fd, nil
}

// countEntries opens dir and, if count is set, counts its entries other
// than silly-renamed files.
func countEntries(dir string, count bool) (int, error) {
	f, err := os.Open(dir)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	if fi, err := f.Stat(); err == nil && !fi.IsDir() {
		return 0, &os.PathError{Op: "open", Path: dir, Err: syscall.ENOTDIR}
	}
	if !count {
		return 0, nil
	}
	names, err := f.Readdirnames(-1)
	n := 0
	for _, name := range names {
		if !silly(name) {
			n++
		}
	}
	return n, err
}

// lookTree opens pkgs, pkgs/<id> and its contents, and counts contents'
// entries if count is set.
func lookTree(pkgs, id string, count bool) (int, error) {
	for _, d := range []string{pkgs, pkgs + "/" + id} {
		if fd, err := openDir(d); err == nil {
			syscall.Close(fd)
		}
	}
	return countEntries(pkgs+"/"+id+"/contents", count)
}

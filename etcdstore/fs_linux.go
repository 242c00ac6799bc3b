package etcdstore

import (
	"os"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// syncTree flushes the file system that holds dir (syncfs), so a tree is on
// the server before it is published.
func syncTree(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	return unix.Syncfs(int(f.Fd()))
}

// ctime is the inode change time of fi (a rename sets it).
func ctime(fi os.FileInfo) time.Time {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return time.Unix(st.Ctim.Sec, st.Ctim.Nsec)
	}
	return fi.ModTime()
}

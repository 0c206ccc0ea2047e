// Empty on purpose: the library target lets `foobar-lb` name this crate as a build
// dependency, so cargo rebuilds the agent when the program changes (as aya-template does).
#![no_std]

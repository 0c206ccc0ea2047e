#[test]
fn loads() {
    let mut dp = foobar_lb::dataplane::Dataplane::load(&Default::default()).unwrap();
    dp.counters().unwrap();
}
